//! Paddock's platform database. The only crate with SQL.
//!
//! [`Store`] is what the controller needs from the database; [`SqlStore`] implements it on
//! SQLite (embedded default, one machine, WAL mode) and on PostgreSQL (several machines), with one
//! set of queries over sqlx's `Any` driver and one migration folder per backend
//! (`migrations/sqlite`, `migrations/postgres`), applied at open.
//!
//! Conventions: timestamps are milliseconds since the Unix epoch (`i64`), flags are `0`/`1`
//! integers, structured observations are JSON text. Every change of desired state or of a server
//! flag bumps the farm's **generation** in the same transaction; front-ends long-poll on it.
//!
//! Deliberately absent: HTTP, wasmtime, policy. The store records; the controller decides.

mod data;
mod purges;

pub use purges::PURGE_LOG_KEEP_MS;

use std::borrow::Cow;
use std::collections::HashMap;

use async_trait::async_trait;
use paddock_api::{
    AppSummary, AuditEntry, BalancerInfo, BalancerReport, DeployPlan, HealthReport, LbState,
    OpState, OpStep, Operation, PlatformBuild, Policy, Registration, Role, RouteEntry, ServerFlag,
    ServerInfo, Step, StepState, TimerClaim, TimerFinish, TimerInfo, TimerLease, TimerRun,
    VersionInfo,
};
use paddock_core::{Manifest, TimerSchedule};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};

/// Why a store operation failed. Callers branch on the kind; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown server {0:?}; `paddock servers` lists the servers of the farm")]
    UnknownServer(String),
    #[error("unknown balancer {0:?}; `paddock routing` lists the balancers of the farm")]
    UnknownBalancer(String),
    #[error("unknown app version {app}@{version}; `paddock app versions {app}` lists its versions")]
    UnknownVersion { app: String, version: String },
    #[error(
        "{app}@{version} already exists with other content; versions are immutable, publish it under a new version"
    )]
    VersionConflict { app: String, version: String },
    #[error("app {app} belongs to zone {existing}, not {requested}; an app stays in one zone")]
    ZoneConflict {
        app: String,
        existing: String,
        requested: String,
    },
    #[error(
        "operation {operation} is running in zone {zone}; one operation at a time acts on a zone: `paddock op watch {operation}` follows it, `paddock op abort {operation}` stops it"
    )]
    ZoneBusy { zone: String, operation: i64 },
    #[error(
        "route {route} of {app} is the route of {owner} (zone {zone}); a route belongs to one app in the farm: give {app} another `route` in its paddock.toml"
    )]
    RouteTaken {
        route: String,
        app: String,
        owner: String,
        zone: String,
    },
    #[error("unknown operation {0}; `paddock op list` lists the operations")]
    UnknownOperation(i64),
    #[error(
        "unknown timer {app}/{timer}; `paddock timer list` lists the timers of the deployed versions"
    )]
    UnknownTimer { app: String, timer: String },
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    BadUrl(String),
    #[error(
        "another controller is running on this database ({holder}); one controller drives a farm at a time: stop that one first (one that stopped or crashed releases the database at once, one whose machine or network went away within about 30 s)"
    )]
    ControllerRunning {
        holder: String,
        /// The PostgreSQL backend holding the role, if known.
        backend: Option<i32>,
    },
    #[error("cannot lock {path} for the controller: {error}")]
    Lock { path: String, error: std::io::Error },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
    #[error(
        "the database has no app data tables ({0}): start this release's controller on it once, which creates them"
    )]
    NoAppData(String),
    #[error("{0}")]
    DataValue(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Whether `put_version` stored something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The same name@version with the same content was already there: nothing changed.
    Unchanged,
}

/// A change of one server's flags; `None` leaves that flag as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerChange {
    pub name: String,
    pub lb: Option<LbState>,
    pub deployment: Option<bool>,
    pub scheduler: Option<bool>,
    /// `Some(None)` clears the server's platform target.
    pub platform_target: Option<Option<String>>,
}

/// A timer declared by a desired app version, as [`Store::sync_timers`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerDef {
    pub app: String,
    pub timer: String,
    pub zone: String,
    pub version: String,
    pub schedule: TimerSchedule,
    pub path: String,
}

/// `next_ms` of a cron expression that matches no time to come.
const NEVER_MS: i64 = i64::MAX / 2;

/// How a step of an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEnd<'a> {
    pub state: StepState,
    pub facts: &'a [String],
    pub message: Option<&'a str>,
}

/// What the controller needs from the platform database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which backend this is, for logs and status: `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Records a front-end (new, or the same name coming back); its flags are kept. Bumps the
    /// generation: the balancers' routing table lists it. A new front-end joining a zone that
    /// an operation holds starts in `drain`: it takes no user traffic in the middle of a
    /// balanced deployment, whose plan does not know it.
    async fn register_server(&self, registration: &Registration, now_ms: i64)
    -> Result<ServerInfo>;
    async fn heartbeat(&self, name: &str, observed: &HealthReport, now_ms: i64) -> Result<()>;
    async fn servers(&self) -> Result<Vec<ServerInfo>>;
    async fn server(&self, name: &str) -> Result<ServerInfo>;
    /// Switches a flag; returns the new generation.
    async fn set_flag(&self, name: &str, flag: ServerFlag, on: bool) -> Result<i64>;
    /// Forgets a server; returns the new generation.
    async fn remove_server(&self, name: &str) -> Result<i64>;
    /// Sets how the balancers treat a front-end, and its weight if given; returns the new
    /// generation.
    async fn set_lb(&self, name: &str, state: LbState, weight: Option<u32>) -> Result<i64>;
    /// Sets the roles of servers, all in one generation (a failover swaps two); returns the
    /// new generation. A passive server takes no traffic and claims no timer.
    async fn set_roles(&self, roles: &[(&str, Role)]) -> Result<i64>;
    /// Sets a zone's balancing policy; returns the new generation.
    async fn set_zone_policy(&self, zone: &str, policy: Policy) -> Result<i64>;
    /// The zones whose policy was set (the others are round-robin).
    async fn zone_policies(&self) -> Result<Vec<(String, Policy)>>;
    /// The run-time overrides of the apps' `[config]`: `(app, key, value)`, by app and key.
    async fn config_overrides(&self) -> Result<Vec<(String, String, String)>>;
    /// Sets (`Some`) or removes (`None`) an override of an app's `[config]`; returns the new
    /// generation (the front-ends take it as they take a new version), or `None` when there
    /// was no override to remove (nothing changed).
    async fn set_config_override(
        &self,
        app: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Option<i64>>;
    /// The route of every app version desired somewhere.
    async fn routes(&self) -> Result<Vec<RouteEntry>>;
    /// Records a balancer's report; `applied_ms` moves when its generation changes.
    async fn balancer_report(&self, report: &BalancerReport, now_ms: i64) -> Result<()>;
    /// Every balancer that ever reported; `alive` when it reported at or after `alive_since_ms`.
    async fn balancers(&self, alive_since_ms: i64) -> Result<Vec<BalancerInfo>>;
    /// Tells balancers which platform build to run (`None`: the one they run), in one
    /// transaction and one generation, which each target records; returns the generation.
    /// Refuses a name that never reported ([`StoreError::UnknownBalancer`]).
    async fn set_balancer_targets(&self, names: &[String], target: Option<&str>) -> Result<i64>;
    /// The platform build a balancer is told to run, with the generation that told it.
    async fn balancer_target(&self, name: &str) -> Result<Option<(PlatformBuild, i64)>>;

    /// Stores an app version and its component. Refuses the same name@version with other content.
    async fn put_version(
        &self,
        manifest: &Manifest,
        version: &str,
        component: &[u8],
        component_sha256: &str,
        now_ms: i64,
    ) -> Result<PutOutcome>;
    async fn version(&self, app: &str, version: &str) -> Result<VersionInfo>;
    /// Every version of `app`, oldest first.
    async fn versions(&self, app: &str) -> Result<Vec<VersionInfo>>;
    async fn apps(&self) -> Result<Vec<AppSummary>>;
    async fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>>;

    async fn put_artifact(
        &self,
        component_sha256: &str,
        engine: &str,
        artifact_sha256: &str,
        bytes: &[u8],
    ) -> Result<()>;
    /// The artifact of a component for an engine: its sha256 and bytes.
    async fn artifact(
        &self,
        component_sha256: &str,
        engine: &str,
    ) -> Result<Option<(String, Vec<u8>)>>;
    /// The sha256 of the artifact, without its bytes.
    async fn artifact_sha256(&self, component_sha256: &str, engine: &str)
    -> Result<Option<String>>;

    /// Makes `version` the desired version of `app` in `zone`; returns the new generation.
    async fn set_desired(&self, app: &str, zone: &str, version: &str, now_ms: i64) -> Result<i64> {
        self.set_desired_many(&[(app, zone, version)], now_ms).await
    }
    /// Sets several desired versions `(app, zone, version)` in one transaction: the front-ends
    /// and balancers see all of them or none. Returns the new generation.
    async fn set_desired_many(&self, versions: &[(&str, &str, &str)], now_ms: i64) -> Result<i64>;
    /// Changes the flags of several servers in one transaction (one generation): the balancers
    /// never route by a table with only some of them. Returns the new generation.
    async fn set_servers(&self, changes: &[ServerChange]) -> Result<i64>;
    /// Records a platform build whose file the controller keeps (again: no change).
    async fn put_platform_build(&self, build: &PlatformBuild) -> Result<()>;
    async fn platform_build(&self, sha256: &str) -> Result<Option<PlatformBuild>>;
    /// Every build kept, newest first.
    async fn platform_builds(&self) -> Result<Vec<PlatformBuild>>;
    /// Forgets a build; `false` when there was none.
    async fn remove_platform_build(&self, sha256: &str) -> Result<bool>;
    /// The desired versions of a zone's apps.
    async fn desired(&self, zone: &str) -> Result<Vec<VersionInfo>>;
    async fn generation(&self) -> Result<i64>;

    async fn audit(&self, actor: &str, action: &str, detail: &str, now_ms: i64) -> Result<()>;
    /// The newest `limit` entries, newest first.
    async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>>;

    /// Records a new running operation and locks the zones of its plan, in one transaction.
    /// Refuses with [`StoreError::ZoneBusy`] when another operation holds one of them.
    async fn create_operation(
        &self,
        kind: &str,
        plan: &DeployPlan,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<i64>;
    /// An operation with its journal.
    async fn operation(&self, id: i64) -> Result<Operation>;
    /// The newest `limit` operations, newest first, with their journals.
    async fn operations(&self, limit: i64) -> Result<Vec<Operation>>;
    /// The operations in state `running`: what a starting controller resumes.
    async fn running_operations(&self) -> Result<Vec<i64>>;
    /// The operation holding `zone`, if any.
    async fn zone_lock(&self, zone: &str) -> Result<Option<i64>>;
    /// Moves an operation to `state`. A final state records the end and releases its zones.
    async fn set_operation_state(
        &self,
        id: i64,
        state: OpState,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<()>;
    /// Asks the running operation to stop and put everything back.
    async fn request_abort(&self, id: i64, now_ms: i64) -> Result<()>;
    /// Journals the start of a step (again, after a restart: `attempts` grows).
    async fn step_started(
        &self,
        id: i64,
        zone: &str,
        step: Step,
        servers: &[String],
        now_ms: i64,
    ) -> Result<()>;
    /// Journals the end of a step and the facts it observed.
    async fn step_ended(
        &self,
        id: i64,
        zone: &str,
        step: Step,
        end: StepEnd<'_>,
        now_ms: i64,
    ) -> Result<()>;

    /// Makes the timers table match the timers of the desired versions: new timers start
    /// counting now, a changed schedule starts over, timers no longer declared are forgotten.
    async fn sync_timers(&self, timers: &[TimerDef], now_ms: i64) -> Result<()>;
    /// Claims up to `limit` due ticks of the server's zone for it, of the `(app, version)`s it
    /// serves, if its scheduler is on: each
    /// gets a lease until `now_ms + lease_ms` and a new fencing token, and a run is recorded. A
    /// tick whose lease expired (its server stopped renewing) is claimed again as a retry. The
    /// next tick is the first one after `now_ms`: ticks missed while no scheduler ran collapse
    /// into one run.
    async fn claim_timers(
        &self,
        server: &str,
        serving: &[(String, String)],
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<TimerClaim>>;
    /// Extends the leases the server still holds (same fencing token) to `until_ms`.
    async fn renew_timers(&self, server: &str, leases: &[TimerLease], until_ms: i64) -> Result<()>;
    /// Records the end of a run and releases its lease if the run still holds it; false (and
    /// nothing changed) when the run was already ended as `lost` (its lease expired and the
    /// tick was claimed again).
    async fn finish_timer(&self, server: &str, finish: &TimerFinish, now_ms: i64) -> Result<bool>;
    async fn timers(&self) -> Result<Vec<TimerInfo>>;
    /// The newest `limit` runs of a timer, newest first.
    async fn timer_runs(&self, app: &str, timer: &str, limit: i64) -> Result<Vec<TimerRun>>;
    /// Makes a timer due now; if a run holds it, right after that run.
    async fn run_timer_now(&self, app: &str, timer: &str, now_ms: i64) -> Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// The SQL implementation of [`Store`], on SQLite or PostgreSQL.
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    /// The SQLite database file (its lock file is beside it).
    sqlite_path: Option<std::path::PathBuf>,
    /// SQLite takes one writer at a time, and a connection that finds the database locked
    /// sleeps in SQLite's busy handler (up to 100 ms a try): the app-data writes of this process
    /// take turns here instead, in order, and only meet other processes' writes there.
    data_writes: tokio::sync::Mutex<()>,
}

/// The controller role over a database, held while this lives and released when it is dropped
/// or the process dies: on SQLite an exclusive lock on `<database>.controller.lock` (which names
/// the holder); on PostgreSQL a session advisory lock on a connection of its own (whose
/// `application_name` names the holder), released by the server when the connection ends.
pub struct ControllerLock {
    held: Held,
}

enum Held {
    File(std::fs::File),
    /// The connection and its backend's process id.
    Postgres(sqlx::AnyConnection, i32),
}

impl ControllerLock {
    /// Whether the role is still held: on PostgreSQL, whether its connection still answers (the
    /// server drops the lock with the connection, after a restart of PostgreSQL for one).
    async fn held(&mut self) -> bool {
        match &mut self.held {
            Held::File(_) => true,
            Held::Postgres(conn, _) => {
                let check = sqlx::query("SELECT 1").execute(&mut *conn);
                matches!(
                    tokio::time::timeout(std::time::Duration::from_secs(5), check).await,
                    Ok(Ok(_))
                )
            }
        }
    }

    /// Gives the role up now (dropping the lock gives it up too, on PostgreSQL once the server
    /// has seen the connection end).
    pub async fn release(self) -> Result<()> {
        match self.held {
            Held::File(file) => file.unlock().map_err(|error| StoreError::Lock {
                path: "the controller lock file".into(),
                error,
            }),
            Held::Postgres(mut conn, _) => {
                use sqlx::Connection as _;
                sqlx::query(&format!("SELECT pg_advisory_unlock({CONTROLLER_LOCK_KEY})"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                Ok(())
            }
        }
    }
}

/// The advisory lock key of the controller role on PostgreSQL ("PADD").
const CONTROLLER_LOCK_KEY: i64 = 0x5041_4444;

/// The database file of a `sqlite://PATH[?OPTIONS]` URL.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split('?').next().unwrap_or(path);
    (!path.is_empty()).then(|| std::path::PathBuf::from(path))
}

/// The controller lock of a SQLite database: an exclusive lock on a file beside it.
fn lock_file(db: &std::path::Path, holder: &str) -> Result<ControllerLock> {
    use std::io::{Read as _, Seek as _, Write as _};
    let mut path = db.as_os_str().to_owned();
    path.push(".controller.lock");
    let path = std::path::PathBuf::from(path);
    let failed = |error| StoreError::Lock {
        path: path.display().to_string(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => format!("it holds {}", path.display()),
                named => named.to_string(),
            };
            return Err(StoreError::ControllerRunning {
                holder,
                backend: None,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{holder}"))
        .map_err(failed)?;
    Ok(ControllerLock {
        held: Held::File(file),
    })
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl SqlStore {
    /// Opens (creating if needed) the database at `url` and applies pending migrations.
    /// `sqlite://PATH` or `postgres://...`.
    pub async fn open(url: &str) -> Result<SqlStore> {
        let store = SqlStore::connect(url, true).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Like [`SqlStore::open`] for a controller: takes the controller role over the database
    /// (see [`SqlStore::lock_controller`]) before it migrates anything, so that a second
    /// controller, maybe of another release, changes nothing under the one running. Waits up to
    /// 2 s for a controller that just stopped to release it; a `standby` controller waits for as
    /// long as another one holds it, and takes over when it stops or dies.
    pub async fn open_as_controller(
        url: &str,
        holder: &str,
        standby: bool,
    ) -> Result<(SqlStore, ControllerLock)> {
        // SQLite's lock is a file beside the database, taken before the database is touched;
        // PostgreSQL's is held by a connection.
        let sqlite = sqlite_path(url);
        let postgres = match sqlite {
            Some(_) => None,
            None => Some(SqlStore::connect(url, true).await?),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut announced = false;
        let lock = loop {
            let attempt = match (&postgres, &sqlite) {
                (Some(store), _) => store.lock_controller(holder).await,
                (None, Some(path)) => lock_file(path, holder),
                (None, None) => return Err(StoreError::BadUrl(url.into())),
            };
            match attempt {
                Err(StoreError::ControllerRunning { holder, .. }) if standby => {
                    if !announced {
                        tracing::info!(
                            running = %holder,
                            "standing by: another controller holds the controller role; taking over when it stops"
                        );
                        announced = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(StoreError::ControllerRunning { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                result => break result?,
            }
        };
        let store = match postgres {
            Some(store) => store,
            None => SqlStore::connect(url, true).await?,
        };
        store.migrate().await?;
        Ok((store, lock))
    }

    /// Connects; `create` makes a missing SQLite file (a front-end opening a farm's database
    /// does not: a misspelt path must not become an empty database).
    async fn connect(url: &str, create: bool) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let (dialect, connect_url) = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::BadUrl(url.into()));
            }
            let sep = if path.contains('?') { '&' } else { '?' };
            let mode = if create { "rwc" } else { "rw" };
            (Dialect::Sqlite, format!("sqlite://{path}{sep}mode={mode}"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(StoreError::BadUrl(url.into()));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if dialect == Dialect::Sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        use sqlx::Executor as _;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await?;
        if dialect == Dialect::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(SqlStore {
            pool,
            dialect,
            sqlite_path: sqlite_path(url),
            data_writes: tokio::sync::Mutex::new(()),
        })
    }

    async fn migrate(&self) -> Result<()> {
        match self.dialect {
            Dialect::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Dialect::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    /// Takes the controller role over this database, as `holder` (who and where, for the error
    /// another controller gets). Fails with [`StoreError::ControllerRunning`] while another
    /// controller holds it.
    pub async fn lock_controller(&self, holder: &str) -> Result<ControllerLock> {
        match &self.sqlite_path {
            Some(db) => lock_file(db, holder),
            None => self.lock_postgres(holder).await,
        }
    }

    /// Keeps the controller role for as long as the process runs: checks every 2 s that it is
    /// still held and, when it was lost (PostgreSQL restarted, or its connection was cut), takes
    /// it again. Returns only when another controller took it meanwhile: this one must stop.
    pub async fn keep_controller_role(&self, mut lock: ControllerLock, holder: &str) -> StoreError {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            if lock.held().await {
                continue;
            }
            // Its own session may outlive the connection on the server for a while (a check
            // that timed out, a network cut): that one is not another controller.
            let own = match &lock.held {
                Held::Postgres(_, backend) => Some(*backend),
                Held::File(_) => None,
            };
            drop(lock);
            tracing::warn!(
                "lost the database connection that holds the controller role; taking it again"
            );
            lock = loop {
                match self.lock_controller(holder).await {
                    Ok(lock) => break lock,
                    Err(StoreError::ControllerRunning { backend, .. })
                        if backend.is_some() && backend == own =>
                    {
                        tracing::warn!(
                            backend = own,
                            "the role is still held by this controller's old session, which the server has not ended yet"
                        );
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e @ StoreError::ControllerRunning { .. }) => return e,
                    Err(e) => {
                        tracing::warn!("cannot take the controller role again yet: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            };
            tracing::info!("holds the controller role again");
        }
    }

    async fn lock_postgres(&self, holder: &str) -> Result<ControllerLock> {
        use sqlx::Connection as _;
        let mut conn = self.pool.acquire().await?.detach();
        let name: String = holder
            .chars()
            .filter(|c| *c != '\'' && !c.is_control())
            .take(63)
            .collect();
        // The server ends the session, and so releases the role, within about 25 s of the
        // controller's machine or network going away (its default is the OS's, often 2 h).
        sqlx::raw_sql(&format!(
            "SET application_name = '{name}'; SET tcp_keepalives_idle = 10; \
             SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
        ))
        .execute(&mut conn)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT pg_try_advisory_lock({CONTROLLER_LOCK_KEY}), pg_backend_pid()"
        ))
        .fetch_one(&mut conn)
        .await?;
        if row.try_get::<bool, _>(0)? {
            let backend = row.try_get::<i32, _>(1)?;
            return Ok(ControllerLock {
                held: Held::Postgres(conn, backend),
            });
        }
        let found = sqlx::query(&format!(
            "SELECT a.application_name, COALESCE(host(a.client_addr), 'a local socket'), a.pid \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 \
             AND l.objid = {CONTROLLER_LOCK_KEY} AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1"
        ))
        .fetch_optional(&mut conn)
        .await?;
        let _ = conn.close().await;
        let named = found.and_then(|row| {
            let name: String = row.try_get(0).ok()?;
            let from: String = row.try_get(1).ok()?;
            let pid: i32 = row.try_get(2).ok()?;
            Some((format!("{name}, connected from {from}"), pid))
        });
        Err(match named {
            Some((holder, pid)) => StoreError::ControllerRunning {
                holder,
                backend: Some(pid),
            },
            None => StoreError::ControllerRunning {
                holder: "its connection is listed in pg_stat_activity".into(),
                backend: None,
            },
        })
    }

    /// Runs one statement as is (administration, e.g. creating a test database).
    pub async fn execute_raw(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }

    /// Queries are written with `$1` parameters; SQLite's numbered form is `?1`.
    fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        match self.dialect {
            Dialect::Postgres => Cow::Borrowed(sql),
            Dialect::Sqlite => Cow::Owned(sql.replace('$', "?")),
        }
    }

    /// Begins a transaction that will write after reading. On SQLite the write lock is taken
    /// first (a no-op write), so that a heartbeat committed meanwhile cannot invalidate the read
    /// snapshot (`SQLITE_BUSY_SNAPSHOT` is not retried by the busy timeout; a lock wait is).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Any>> {
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Sqlite {
            sqlx::query("UPDATE generation SET value = value WHERE id = 1")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Begins a transaction that reads, decides and writes with no other such transaction in
    /// between, on PostgreSQL too (a row lock on the generation): two uploads of one version, or
    /// two deploys whose routes collide, are decided one after the other.
    async fn begin_exclusive(&self) -> Result<sqlx::Transaction<'_, sqlx::Any>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE generation SET value = value WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn bump_generation(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64> {
        let row = sqlx::query(
            &self.sql("UPDATE generation SET value = value + 1 WHERE id = 1 RETURNING value"),
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }
}

const SERVER_COLUMNS: &str = "name, zone, address, platform_version, engine, role, deployment_on, \
     scheduler_on, registered_ms, heartbeat_ms, observed, lb, weight, platform_target, \
     platform_target_generation";

fn server_from_row(row: &AnyRow) -> Result<ServerInfo> {
    let role: String = row.try_get("role")?;
    let lb: String = row.try_get("lb")?;
    let observed: Option<String> = row.try_get("observed")?;
    Ok(ServerInfo {
        name: row.try_get("name")?,
        zone: row.try_get("zone")?,
        address: row.try_get("address")?,
        platform_version: row.try_get("platform_version")?,
        engine: row.try_get("engine")?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
        deployment: row.try_get::<i64, _>("deployment_on")? != 0,
        scheduler: row.try_get::<i64, _>("scheduler_on")? != 0,
        registered_ms: row.try_get("registered_ms")?,
        heartbeat_ms: row.try_get("heartbeat_ms")?,
        observed: match observed {
            Some(json) => Some(
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("observed state: {e}")))?,
            ),
            None => None,
        },
        lb: LbState::parse(&lb).ok_or_else(|| StoreError::Corrupt(format!("lb state {lb:?}")))?,
        weight: u32::try_from(row.try_get::<i64, _>("weight")?)
            .map_err(|_| StoreError::Corrupt("weight out of range".into()))?,
        platform_target: row.try_get("platform_target")?,
        platform_target_generation: row.try_get("platform_target_generation")?,
    })
}

fn platform_build_from_row(row: &AnyRow) -> Result<PlatformBuild> {
    Ok(PlatformBuild {
        sha256: row.try_get("sha256")?,
        version: row.try_get("version")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?)
            .map_err(|_| StoreError::Corrupt("platform build size out of range".into()))?,
        uploaded_ms: row.try_get("uploaded_ms")?,
    })
}

/// Every desired version, with its manifest (and so its route).
const DESIRED_VERSIONS: &str = "SELECT v.app AS app, v.version AS version, v.zone AS zone, \
     v.manifest AS manifest, v.component_sha256 AS component_sha256, v.created_ms AS created_ms \
     FROM desired d JOIN versions v ON v.app = d.app AND v.version = d.version \
     ORDER BY v.zone, v.app";

const VERSION_COLUMNS: &str = "app, version, zone, manifest, component_sha256, created_ms";

fn version_from_row(row: &AnyRow) -> Result<VersionInfo> {
    let manifest: String = row.try_get("manifest")?;
    Ok(VersionInfo {
        app: row.try_get("app")?,
        version: row.try_get("version")?,
        zone: row.try_get("zone")?,
        component_sha256: row.try_get("component_sha256")?,
        created_ms: row.try_get("created_ms")?,
        manifest: serde_json::from_str(&manifest)
            .map_err(|e| StoreError::Corrupt(format!("manifest: {e}")))?,
    })
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    async fn register_server(&self, r: &Registration, now_ms: i64) -> Result<ServerInfo> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "INSERT INTO servers (name, zone, address, platform_version, engine, registered_ms, lb, \
             scheduler_on) \
             VALUES ($1, $2, $3, $4, $5, $6, \
             CASE WHEN EXISTS (SELECT 1 FROM zone_locks WHERE zone = $2) THEN 'drain' ELSE 'ready' END, \
             CASE WHEN EXISTS (SELECT 1 FROM zone_locks WHERE zone = $2) THEN 0 ELSE 1 END) \
             ON CONFLICT (name) DO UPDATE SET zone = excluded.zone, address = excluded.address, \
             platform_version = excluded.platform_version, engine = excluded.engine, \
             registered_ms = excluded.registered_ms",
        ))
        .bind(&r.name)
        .bind(&r.zone)
        .bind(&r.address)
        .bind(&r.platform_version)
        .bind(&r.engine)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        self.server(&r.name).await
    }

    async fn heartbeat(&self, name: &str, observed: &HealthReport, now_ms: i64) -> Result<()> {
        let json = serde_json::to_string(observed)
            .map_err(|e| StoreError::Corrupt(format!("observed state: {e}")))?;
        let done = sqlx::query(
            &self.sql("UPDATE servers SET heartbeat_ms = $1, observed = $2 WHERE name = $3"),
        )
        .bind(now_ms)
        .bind(json)
        .bind(name)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownServer(name.into()));
        }
        Ok(())
    }

    async fn servers(&self) -> Result<Vec<ServerInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers ORDER BY zone, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(server_from_row).collect()
    }

    async fn server(&self, name: &str) -> Result<ServerInfo> {
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => server_from_row(&row),
            None => Err(StoreError::UnknownServer(name.into())),
        }
    }

    async fn set_flag(&self, name: &str, flag: ServerFlag, on: bool) -> Result<i64> {
        let column = match flag {
            ServerFlag::Deployment => "deployment_on",
            ServerFlag::Scheduler => "scheduler_on",
        };
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query(&self.sql(&format!("UPDATE servers SET {column} = $1 WHERE name = $2")))
                .bind(i64::from(on))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownServer(name.into()));
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn remove_server(&self, name: &str) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&self.sql("DELETE FROM servers WHERE name = $1"))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownServer(name.into()));
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn set_lb(&self, name: &str, state: LbState, weight: Option<u32>) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            &self.sql("UPDATE servers SET lb = $1, weight = COALESCE($2, weight) WHERE name = $3"),
        )
        .bind(state.as_str())
        .bind(weight.map(i64::from))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownServer(name.into()));
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn set_roles(&self, roles: &[(&str, Role)]) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        for (name, role) in roles {
            let done = sqlx::query(&self.sql("UPDATE servers SET role = $1 WHERE name = $2"))
                .bind(role.as_str())
                .bind(*name)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::UnknownServer((*name).into()));
            }
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn set_zone_policy(&self, zone: &str, policy: Policy) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&self.sql(
            "INSERT INTO zones (zone, policy) VALUES ($1, $2) \
             ON CONFLICT (zone) DO UPDATE SET policy = excluded.policy",
        ))
        .bind(zone)
        .bind(policy.as_str())
        .execute(&mut *tx)
        .await?;
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn config_overrides(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query("SELECT app, key, value FROM app_config ORDER BY app, key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    async fn set_config_override(
        &self,
        app: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin_write().await?;
        match value {
            Some(value) => {
                sqlx::query(&self.sql(
                    "INSERT INTO app_config (app, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (app, key) DO UPDATE SET value = excluded.value",
                ))
                .bind(app)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                let done =
                    sqlx::query(&self.sql("DELETE FROM app_config WHERE app = $1 AND key = $2"))
                        .bind(app)
                        .bind(key)
                        .execute(&mut *tx)
                        .await?;
                if done.rows_affected() == 0 {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(generation))
    }

    async fn zone_policies(&self) -> Result<Vec<(String, Policy)>> {
        let rows = sqlx::query("SELECT zone, policy FROM zones ORDER BY zone")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let policy: String = row.try_get("policy")?;
                Ok((
                    row.try_get("zone")?,
                    Policy::parse(&policy)
                        .ok_or_else(|| StoreError::Corrupt(format!("policy {policy:?}")))?,
                ))
            })
            .collect()
    }

    async fn routes(&self) -> Result<Vec<RouteEntry>> {
        let rows = sqlx::query(DESIRED_VERSIONS).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let v = version_from_row(row)?;
                Ok(RouteEntry {
                    prefix: v.manifest.route,
                    app: v.app,
                    zone: v.zone,
                })
            })
            .collect()
    }

    async fn balancer_report(&self, report: &BalancerReport, now_ms: i64) -> Result<()> {
        let json = serde_json::to_string(report)
            .map_err(|e| StoreError::Corrupt(format!("balancer report: {e}")))?;
        sqlx::query(&self.sql(
            "INSERT INTO balancers (name, report, generation, applied_ms, heartbeat_ms) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (name) DO UPDATE SET report = excluded.report, \
             heartbeat_ms = excluded.heartbeat_ms, \
             applied_ms = CASE WHEN balancers.generation = excluded.generation \
                 THEN balancers.applied_ms ELSE excluded.applied_ms END, \
             generation = excluded.generation",
        ))
        .bind(&report.name)
        .bind(json)
        .bind(report.generation)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn balancers(&self, alive_since_ms: i64) -> Result<Vec<BalancerInfo>> {
        let rows = sqlx::query(
            "SELECT report, applied_ms, heartbeat_ms, platform_target, platform_target_generation \
             FROM balancers ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let report: String = row.try_get("report")?;
                let heartbeat_ms: i64 = row.try_get("heartbeat_ms")?;
                Ok(BalancerInfo {
                    report: serde_json::from_str(&report)
                        .map_err(|e| StoreError::Corrupt(format!("balancer report: {e}")))?,
                    applied_ms: row.try_get("applied_ms")?,
                    heartbeat_ms,
                    alive: heartbeat_ms >= alive_since_ms,
                    platform_target: row.try_get("platform_target")?,
                    platform_target_generation: row.try_get("platform_target_generation")?,
                })
            })
            .collect()
    }

    async fn set_balancer_targets(&self, names: &[String], target: Option<&str>) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        for name in names {
            let done =
                sqlx::query(&self.sql("UPDATE balancers SET platform_target = $1 WHERE name = $2"))
                    .bind(target)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::UnknownBalancer(name.clone()));
            }
        }
        // Rows first, then the generation row, as in `set_servers`.
        let generation = self.bump_generation(&mut tx).await?;
        for name in names {
            sqlx::query(
                &self.sql("UPDATE balancers SET platform_target_generation = $1 WHERE name = $2"),
            )
            .bind(generation)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    async fn balancer_target(&self, name: &str) -> Result<Option<(PlatformBuild, i64)>> {
        let row = sqlx::query(&self.sql(
            "SELECT p.sha256 AS sha256, p.version AS version, p.size AS size, \
             p.uploaded_ms AS uploaded_ms, b.platform_target_generation AS generation \
             FROM balancers b JOIN platform_builds p ON p.sha256 = b.platform_target \
             WHERE b.name = $1",
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|row| {
                let generation: Option<i64> = row.try_get("generation")?;
                Ok((platform_build_from_row(row)?, generation.unwrap_or(0)))
            })
            .transpose()
    }

    async fn put_version(
        &self,
        manifest: &Manifest,
        version: &str,
        component: &[u8],
        component_sha256: &str,
        now_ms: i64,
    ) -> Result<PutOutcome> {
        let manifest_json = serde_json::to_string(manifest)
            .map_err(|e| StoreError::Corrupt(format!("manifest: {e}")))?;
        let mut tx = self.begin_exclusive().await?;
        let existing = sqlx::query(&self.sql(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE app = $1 AND version = $2"
        )))
        .bind(&manifest.name)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let existing = version_from_row(&row)?;
            return if existing.component_sha256 == component_sha256
                && existing.manifest == *manifest
            {
                Ok(PutOutcome::Unchanged)
            } else {
                Err(StoreError::VersionConflict {
                    app: manifest.name.clone(),
                    version: version.into(),
                })
            };
        }
        let zone = sqlx::query(&self.sql("SELECT zone FROM versions WHERE app = $1 LIMIT 1"))
            .bind(&manifest.name)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(zone) = zone {
            let zone: String = zone.try_get(0)?;
            if zone != manifest.zone {
                return Err(StoreError::ZoneConflict {
                    app: manifest.name.clone(),
                    existing: zone,
                    requested: manifest.zone.clone(),
                });
            }
        }
        sqlx::query(&self.sql(
            "INSERT INTO blobs (sha256, size, bytes) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
        ))
        .bind(component_sha256)
        .bind(component.len() as i64)
        .bind(component)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.sql(
            "INSERT INTO versions (app, version, zone, manifest, component_sha256, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        ))
        .bind(&manifest.name)
        .bind(version)
        .bind(&manifest.zone)
        .bind(manifest_json)
        .bind(component_sha256)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PutOutcome::Created)
    }

    async fn version(&self, app: &str, version: &str) -> Result<VersionInfo> {
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE app = $1 AND version = $2"
        )))
        .bind(app)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => version_from_row(&row),
            None => Err(StoreError::UnknownVersion {
                app: app.into(),
                version: version.into(),
            }),
        }
    }

    async fn versions(&self, app: &str) -> Result<Vec<VersionInfo>> {
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE app = $1 ORDER BY created_ms, version"
        )))
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    async fn apps(&self) -> Result<Vec<AppSummary>> {
        let rows = sqlx::query(
            "SELECT v.app AS app, v.zone AS zone, COUNT(*) AS n, \
             (SELECT l.version FROM versions l WHERE l.app = v.app ORDER BY l.created_ms DESC, l.version DESC LIMIT 1) AS latest, \
             (SELECT d.version FROM desired d WHERE d.app = v.app AND d.zone = v.zone) AS desired \
             FROM versions v GROUP BY v.app, v.zone ORDER BY v.app",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AppSummary {
                    name: row.try_get("app")?,
                    zone: row.try_get("zone")?,
                    versions: row.try_get::<i64, _>("n")? as u64,
                    latest: row.try_get("latest")?,
                    desired: row.try_get("desired")?,
                })
            })
            .collect()
    }

    async fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query(&self.sql("SELECT bytes FROM blobs WHERE sha256 = $1"))
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    async fn put_artifact(
        &self,
        component_sha256: &str,
        engine: &str,
        artifact_sha256: &str,
        bytes: &[u8],
    ) -> Result<()> {
        sqlx::query(&self.sql(
            "INSERT INTO artifacts (component_sha256, engine, artifact_sha256, bytes) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (component_sha256, engine) DO UPDATE SET artifact_sha256 = excluded.artifact_sha256, bytes = excluded.bytes",
        ))
        .bind(component_sha256)
        .bind(engine)
        .bind(artifact_sha256)
        .bind(bytes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn artifact(
        &self,
        component_sha256: &str,
        engine: &str,
    ) -> Result<Option<(String, Vec<u8>)>> {
        let row = sqlx::query(&self.sql(
            "SELECT artifact_sha256, bytes FROM artifacts WHERE component_sha256 = $1 AND engine = $2",
        ))
        .bind(component_sha256)
        .bind(engine)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
            None => None,
        })
    }

    async fn artifact_sha256(
        &self,
        component_sha256: &str,
        engine: &str,
    ) -> Result<Option<String>> {
        let row = sqlx::query(&self.sql(
            "SELECT artifact_sha256 FROM artifacts WHERE component_sha256 = $1 AND engine = $2",
        ))
        .bind(component_sha256)
        .bind(engine)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    async fn set_desired_many(&self, versions: &[(&str, &str, &str)], now_ms: i64) -> Result<i64> {
        let mut tx = self.begin_exclusive().await?;
        for &(app, zone, version) in versions {
            let exists = sqlx::query(
                &self.sql("SELECT 1 FROM versions WHERE app = $1 AND version = $2 AND zone = $3"),
            )
            .bind(app)
            .bind(version)
            .bind(zone)
            .fetch_optional(&mut *tx)
            .await?;
            if exists.is_none() {
                return Err(StoreError::UnknownVersion {
                    app: app.into(),
                    version: version.into(),
                });
            }
            sqlx::query(&self.sql(
                "INSERT INTO desired (app, zone, version, updated_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (app, zone) DO UPDATE SET version = excluded.version, updated_ms = excluded.updated_ms",
            ))
            .bind(app)
            .bind(zone)
            .bind(version)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        // A route is one app's in the whole farm: the balancers route by path before they pick
        // a zone, and a front-end cannot serve two apps at one route.
        let mut owners: HashMap<String, VersionInfo> = HashMap::new();
        for row in sqlx::query(DESIRED_VERSIONS).fetch_all(&mut *tx).await? {
            let v = version_from_row(&row)?;
            let Some(other) = owners.insert(v.manifest.route.clone(), v.clone()) else {
                continue;
            };
            // Only a clash this change makes is refused (one already stored is left for its
            // apps' next deploys to resolve); the app being deployed is named first.
            let written = |app: &str| versions.iter().any(|&(a, ..)| a == app);
            let (new, old) = match (written(&v.app), written(&other.app)) {
                (true, _) => (v, other),
                (false, true) => (other, v),
                (false, false) => continue,
            };
            return Err(StoreError::RouteTaken {
                route: new.manifest.route,
                app: format!("{}@{}", new.app, new.version),
                owner: format!("{}@{}", old.app, old.version),
                zone: old.zone,
            });
        }
        let generation = self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    async fn set_servers(&self, changes: &[ServerChange]) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        for change in changes {
            let done = sqlx::query(&self.sql(
                "UPDATE servers SET lb = COALESCE($1, lb), deployment_on = COALESCE($2, deployment_on), \
                 scheduler_on = COALESCE($3, scheduler_on), \
                 platform_target = CASE WHEN $4 = 1 THEN $5 ELSE platform_target END \
                 WHERE name = $6",
            ))
            .bind(change.lb.map(LbState::as_str))
            .bind(change.deployment.map(i64::from))
            .bind(change.scheduler.map(i64::from))
            .bind(i64::from(change.platform_target.is_some()))
            .bind(change.platform_target.clone().flatten())
            .bind(&change.name)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::UnknownServer(change.name.clone()));
            }
        }
        // Last, like every other write (server rows, then the generation row: one lock order):
        // a target records the generation that set it, in rows this transaction holds already.
        let generation = self.bump_generation(&mut tx).await?;
        for change in changes.iter().filter(|c| c.platform_target.is_some()) {
            sqlx::query(
                &self.sql("UPDATE servers SET platform_target_generation = $1 WHERE name = $2"),
            )
            .bind(generation)
            .bind(&change.name)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    async fn put_platform_build(&self, build: &PlatformBuild) -> Result<()> {
        sqlx::query(&self.sql(
            "INSERT INTO platform_builds (sha256, version, size, uploaded_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sha256) DO NOTHING",
        ))
        .bind(&build.sha256)
        .bind(&build.version)
        .bind(i64::try_from(build.size).unwrap_or(i64::MAX))
        .bind(build.uploaded_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn platform_build(&self, sha256: &str) -> Result<Option<PlatformBuild>> {
        let row = sqlx::query(&self.sql(
            "SELECT sha256, version, size, uploaded_ms FROM platform_builds WHERE sha256 = $1",
        ))
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(platform_build_from_row).transpose()
    }

    async fn platform_builds(&self) -> Result<Vec<PlatformBuild>> {
        let rows = sqlx::query(
            "SELECT sha256, version, size, uploaded_ms FROM platform_builds \
             ORDER BY uploaded_ms DESC, sha256",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(platform_build_from_row).collect()
    }

    async fn remove_platform_build(&self, sha256: &str) -> Result<bool> {
        let done = sqlx::query(&self.sql("DELETE FROM platform_builds WHERE sha256 = $1"))
            .bind(sha256)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn desired(&self, zone: &str) -> Result<Vec<VersionInfo>> {
        let rows = sqlx::query(&self.sql(
            "SELECT v.app AS app, v.version AS version, v.zone AS zone, v.manifest AS manifest, \
             v.component_sha256 AS component_sha256, v.created_ms AS created_ms \
             FROM desired d JOIN versions v ON v.app = d.app AND v.version = d.version \
             WHERE d.zone = $1 ORDER BY v.app",
        ))
        .bind(zone)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    async fn generation(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM generation WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn audit(&self, actor: &str, action: &str, detail: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            &self.sql("INSERT INTO audit (at_ms, actor, action, detail) VALUES ($1, $2, $3, $4)"),
        )
        .bind(now_ms)
        .bind(actor)
        .bind(action)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows =
            sqlx::query(&self.sql(
                "SELECT id, at_ms, actor, action, detail FROM audit ORDER BY id DESC LIMIT $1",
            ))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: row.try_get("id")?,
                    at_ms: row.try_get("at_ms")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
    }

    async fn create_operation(
        &self,
        kind: &str,
        plan: &DeployPlan,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<i64> {
        let zones: Vec<&str> = plan.zones.iter().map(|z| z.zone.as_str()).collect();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&self.sql(
            "INSERT INTO operations (kind, state, zones, plan, message, created_ms, updated_ms) \
             VALUES ($1, 'running', $2, $3, $4, $5, $5) RETURNING id",
        ))
        .bind(kind)
        .bind(to_json(&zones)?)
        .bind(to_json(plan)?)
        .bind(message)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get(0)?;
        for zone in zones {
            let done = sqlx::query(&self.sql(
                "INSERT INTO zone_locks (zone, op_id) VALUES ($1, $2) ON CONFLICT (zone) DO NOTHING",
            ))
            .bind(zone)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                let holder = sqlx::query(&self.sql("SELECT op_id FROM zone_locks WHERE zone = $1"))
                    .bind(zone)
                    .fetch_optional(&mut *tx)
                    .await?;
                return Err(StoreError::ZoneBusy {
                    zone: zone.to_string(),
                    // Released in the meantime: the caller may simply try again.
                    operation: match holder {
                        Some(row) => row.try_get(0)?,
                        None => 0,
                    },
                });
            }
        }
        tx.commit().await?;
        Ok(id)
    }

    async fn operation(&self, id: i64) -> Result<Operation> {
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::UnknownOperation(id))?;
        let mut operation = operation_from_row(&row)?;
        operation.steps = self.steps(id).await?;
        Ok(operation)
    }

    async fn operations(&self, limit: i64) -> Result<Vec<Operation>> {
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations ORDER BY id DESC LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut operations = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut operation = operation_from_row(row)?;
            operation.steps = self.steps(operation.id).await?;
            operations.push(operation);
        }
        Ok(operations)
    }

    async fn running_operations(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT id FROM operations WHERE state = 'running' ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<i64, _>(0)?))
            .collect()
    }

    async fn zone_lock(&self, zone: &str) -> Result<Option<i64>> {
        let row = sqlx::query(&self.sql("SELECT op_id FROM zone_locks WHERE zone = $1"))
            .bind(zone)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    async fn set_operation_state(
        &self,
        id: i64,
        state: OpState,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let ended = state.is_final().then_some(now_ms);
        let done = sqlx::query(&self.sql(
            "UPDATE operations SET state = $1, message = COALESCE($2, message), updated_ms = $3, \
             ended_ms = $4 WHERE id = $5",
        ))
        .bind(state.as_str())
        .bind(message)
        .bind(now_ms)
        .bind(ended)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownOperation(id));
        }
        if state.is_final() {
            sqlx::query(&self.sql("DELETE FROM zone_locks WHERE op_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn request_abort(&self, id: i64, now_ms: i64) -> Result<()> {
        let done = sqlx::query(
            &self.sql("UPDATE operations SET abort_requested = 1, updated_ms = $1 WHERE id = $2"),
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownOperation(id));
        }
        Ok(())
    }

    async fn step_started(
        &self,
        id: i64,
        zone: &str,
        step: Step,
        servers: &[String],
        now_ms: i64,
    ) -> Result<()> {
        let ordinal = Step::all().position(|s| s == step).unwrap_or(0) as i64;
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "INSERT INTO operation_steps (op_id, zone, step, ordinal, servers, state, started_ms) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6) \
             ON CONFLICT (op_id, zone, step) DO UPDATE SET state = 'running', ended_ms = NULL, \
             message = NULL, attempts = operation_steps.attempts + 1",
        ))
        .bind(id)
        .bind(zone)
        .bind(step.as_str())
        .bind(ordinal)
        .bind(to_json(servers)?)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.sql("UPDATE operations SET updated_ms = $1 WHERE id = $2"))
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn step_ended(
        &self,
        id: i64,
        zone: &str,
        step: Step,
        end: StepEnd<'_>,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "UPDATE operation_steps SET state = $1, ended_ms = $2, facts = $3, message = $4 \
             WHERE op_id = $5 AND zone = $6 AND step = $7",
        ))
        .bind(end.state.as_str())
        .bind(now_ms)
        .bind(to_json(end.facts)?)
        .bind(end.message)
        .bind(id)
        .bind(zone)
        .bind(step.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.sql("UPDATE operations SET updated_ms = $1 WHERE id = $2"))
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sync_timers(&self, timers: &[TimerDef], now_ms: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query("SELECT app, timer, schedule FROM timers")
            .fetch_all(&mut *tx)
            .await?;
        for row in &rows {
            let (app, timer): (String, String) = (row.try_get("app")?, row.try_get("timer")?);
            if !timers.iter().any(|t| t.app == app && t.timer == timer) {
                sqlx::query(&self.sql("DELETE FROM timers WHERE app = $1 AND timer = $2"))
                    .bind(&app)
                    .bind(&timer)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for t in timers {
            let schedule = to_json(&t.schedule)?;
            let next = t.schedule.next_after(now_ms, now_ms).unwrap_or(NEVER_MS);
            let existing = rows.iter().find(|r| {
                r.try_get::<String, _>("app").is_ok_and(|a| a == t.app)
                    && r.try_get::<String, _>("timer").is_ok_and(|n| n == t.timer)
            });
            match existing {
                Some(row) if row.try_get::<String, _>("schedule")? == schedule => {
                    sqlx::query(&self.sql(
                        "UPDATE timers SET zone = $1, version = $2, path = $3 WHERE app = $4 AND timer = $5",
                    ))
                    .bind(&t.zone)
                    .bind(&t.version)
                    .bind(&t.path)
                    .bind(&t.app)
                    .bind(&t.timer)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(_) => {
                    sqlx::query(&self.sql(
                        "UPDATE timers SET zone = $1, version = $2, path = $3, schedule = $4, \
                         anchor_ms = $5, next_ms = $6 WHERE app = $7 AND timer = $8",
                    ))
                    .bind(&t.zone)
                    .bind(&t.version)
                    .bind(&t.path)
                    .bind(&schedule)
                    .bind(now_ms)
                    .bind(next)
                    .bind(&t.app)
                    .bind(&t.timer)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query(&self.sql(
                        "INSERT INTO timers (app, timer, zone, version, schedule, path, anchor_ms, next_ms, fencing) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                         (SELECT COALESCE(MAX(fencing), 0) FROM timer_runs WHERE app = $1 AND timer = $2))",
                    ))
                    .bind(&t.app)
                    .bind(&t.timer)
                    .bind(&t.zone)
                    .bind(&t.version)
                    .bind(&schedule)
                    .bind(&t.path)
                    .bind(now_ms)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_timers(
        &self,
        server: &str,
        serving: &[(String, String)],
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<TimerClaim>> {
        let mut tx = self.begin_write().await?;
        // PostgreSQL: the server's row is share-locked, so that switching its scheduler off
        // waits for a claim in progress, and a wait for "no timer running" that starts after
        // the switch sees this claim's leases.
        let share = match self.dialect {
            Dialect::Postgres => " FOR SHARE",
            Dialect::Sqlite => "",
        };
        let row = sqlx::query(&self.sql(&format!(
            "SELECT zone, scheduler_on, role FROM servers WHERE name = $1{share}"
        )))
        .bind(server)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::UnknownServer(server.into()))?;
        // A passive server stands by: its scheduler flag waits for its activation.
        if row.try_get::<i64, _>("scheduler_on")? == 0
            || row.try_get::<String, _>("role")? != Role::Active.as_str()
        {
            return Ok(Vec::new());
        }
        let zone: String = row.try_get("zone")?;
        // PostgreSQL: rows another claimer holds are skipped, not waited for. SQLite: the write
        // lock taken by begin_write serializes claims.
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let due = sqlx::query(&self.sql(&format!(
            "SELECT app, timer, version, schedule, path, anchor_ms, next_ms, fencing, lease_owner, \
             lease_until, tick_ms FROM timers WHERE zone = $1 AND \
             ((lease_until IS NULL AND next_ms <= $2) OR (lease_until IS NOT NULL AND lease_until < $2)) \
             ORDER BY next_ms{lock}"
        )))
        .bind(&zone)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut claims = Vec::new();
        for row in &due {
            if claims.len() as i64 >= limit {
                break;
            }
            let app: String = row.try_get("app")?;
            let timer: String = row.try_get("timer")?;
            // Only timers of the versions this server serves: one still loading (or left on an
            // older version) leaves the tick to another server.
            let version: String = row.try_get("version")?;
            if !serving.iter().any(|(a, v)| *a == app && *v == version) {
                continue;
            }
            let old_fencing: i64 = row.try_get("fencing")?;
            let lease_until: Option<i64> = row.try_get("lease_until")?;
            let retry = lease_until.is_some();
            let (tick, next) = if retry {
                let owner: Option<String> = row.try_get("lease_owner")?;
                sqlx::query(&self.sql(
                    "UPDATE timer_runs SET outcome = 'lost', ended_ms = $1, detail = $2 \
                     WHERE app = $3 AND timer = $4 AND fencing = $5 AND outcome = 'running'",
                ))
                .bind(now_ms)
                .bind(format!(
                    "lease expired: {} stopped renewing it",
                    owner.unwrap_or_default()
                ))
                .bind(&app)
                .bind(&timer)
                .bind(old_fencing)
                .execute(&mut *tx)
                .await?;
                let tick: Option<i64> = row.try_get("tick_ms")?;
                (tick.unwrap_or(now_ms), row.try_get::<i64, _>("next_ms")?)
            } else {
                let schedule: TimerSchedule =
                    from_json(&row.try_get::<String, _>("schedule")?, "timer schedule")?;
                let anchor: i64 = row.try_get("anchor_ms")?;
                (
                    row.try_get::<i64, _>("next_ms")?,
                    schedule.next_after(now_ms, anchor).unwrap_or(NEVER_MS),
                )
            };
            let fencing = old_fencing + 1;
            let until = now_ms + lease_ms;
            sqlx::query(&self.sql(
                "UPDATE timers SET fencing = $1, lease_owner = $2, lease_until = $3, tick_ms = $4, \
                 next_ms = $5 WHERE app = $6 AND timer = $7",
            ))
            .bind(fencing)
            .bind(server)
            .bind(until)
            .bind(tick)
            .bind(next)
            .bind(&app)
            .bind(&timer)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&self.sql(
                "INSERT INTO timer_runs (app, timer, server, tick_ms, fencing, retry, started_ms, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'running')",
            ))
            .bind(&app)
            .bind(&timer)
            .bind(server)
            .bind(tick)
            .bind(fencing)
            .bind(i64::from(retry))
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            claims.push(TimerClaim {
                version: row.try_get("version")?,
                path: row.try_get("path")?,
                app,
                timer,
                tick_ms: tick,
                fencing,
                retry,
                lease_until_ms: until,
            });
        }
        tx.commit().await?;
        Ok(claims)
    }

    async fn renew_timers(&self, server: &str, leases: &[TimerLease], until_ms: i64) -> Result<()> {
        for lease in leases {
            sqlx::query(&self.sql(
                "UPDATE timers SET lease_until = $1 WHERE app = $2 AND timer = $3 AND fencing = $4 \
                 AND lease_owner = $5",
            ))
            .bind(until_ms)
            .bind(&lease.app)
            .bind(&lease.timer)
            .bind(lease.fencing)
            .bind(server)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn finish_timer(&self, server: &str, finish: &TimerFinish, now_ms: i64) -> Result<bool> {
        let lease = &finish.lease;
        let mut tx = self.begin_write().await?;
        // The run record is this server's own: it is closed even when the timer is no longer
        // declared. The lease is released only if it is still this run's.
        let closed = sqlx::query(&self.sql(
            "UPDATE timer_runs SET outcome = $1, ended_ms = $2, detail = $3 \
             WHERE app = $4 AND timer = $5 AND fencing = $6 AND server = $7 AND outcome = 'running'",
        ))
        .bind(if finish.ok { "ok" } else { "failed" })
        .bind(now_ms)
        .bind(&finish.detail)
        .bind(&lease.app)
        .bind(&lease.timer)
        .bind(lease.fencing)
        .bind(server)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.sql(
            "UPDATE timers SET lease_owner = NULL, lease_until = NULL, tick_ms = NULL \
             WHERE app = $1 AND timer = $2 AND fencing = $3 AND lease_owner = $4",
        ))
        .bind(&lease.app)
        .bind(&lease.timer)
        .bind(lease.fencing)
        .bind(server)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(closed.rows_affected() > 0)
    }

    async fn timers(&self) -> Result<Vec<TimerInfo>> {
        let rows = sqlx::query(
            "SELECT app, timer, zone, version, schedule, path, next_ms, lease_owner, lease_until \
             FROM timers ORDER BY app, timer",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TimerInfo {
                    app: row.try_get("app")?,
                    timer: row.try_get("timer")?,
                    zone: row.try_get("zone")?,
                    version: row.try_get("version")?,
                    schedule: from_json(&row.try_get::<String, _>("schedule")?, "timer schedule")?,
                    path: row.try_get("path")?,
                    next_ms: row.try_get("next_ms")?,
                    running_on: row.try_get("lease_owner")?,
                    lease_until_ms: row.try_get("lease_until")?,
                })
            })
            .collect()
    }

    async fn timer_runs(&self, app: &str, timer: &str, limit: i64) -> Result<Vec<TimerRun>> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, app, timer, server, tick_ms, started_ms, ended_ms, outcome, retry, detail \
             FROM timer_runs WHERE app = $1 AND timer = $2 ORDER BY id DESC LIMIT $3",
        ))
        .bind(app)
        .bind(timer)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TimerRun {
                    id: row.try_get("id")?,
                    app: row.try_get("app")?,
                    timer: row.try_get("timer")?,
                    server: row.try_get("server")?,
                    tick_ms: row.try_get("tick_ms")?,
                    started_ms: row.try_get("started_ms")?,
                    ended_ms: row.try_get("ended_ms")?,
                    outcome: row.try_get("outcome")?,
                    retry: row.try_get::<i64, _>("retry")? != 0,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
    }

    async fn run_timer_now(&self, app: &str, timer: &str, now_ms: i64) -> Result<()> {
        let done =
            sqlx::query(&self.sql("UPDATE timers SET next_ms = $1 WHERE app = $2 AND timer = $3"))
                .bind(now_ms)
                .bind(app)
                .bind(timer)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownTimer {
                app: app.into(),
                timer: timer.into(),
            });
        }
        Ok(())
    }
}

impl SqlStore {
    /// An operation's journal, in the order the steps started.
    async fn steps(&self, id: i64) -> Result<Vec<OpStep>> {
        let rows = sqlx::query(&self.sql(
            "SELECT zone, step, servers, state, started_ms, ended_ms, attempts, facts, message \
             FROM operation_steps WHERE op_id = $1 ORDER BY started_ms, ordinal",
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let step: String = row.try_get("step")?;
                let state: String = row.try_get("state")?;
                Ok(OpStep {
                    zone: row.try_get("zone")?,
                    step: Step::parse(&step)
                        .ok_or_else(|| StoreError::Corrupt(format!("step {step:?}")))?,
                    servers: from_json(&row.try_get::<String, _>("servers")?, "step servers")?,
                    state: StepState::parse(&state)
                        .ok_or_else(|| StoreError::Corrupt(format!("step state {state:?}")))?,
                    started_ms: row.try_get("started_ms")?,
                    ended_ms: row.try_get("ended_ms")?,
                    attempts: row.try_get("attempts")?,
                    facts: from_json(&row.try_get::<String, _>("facts")?, "step facts")?,
                    message: row.try_get("message")?,
                })
            })
            .collect()
    }
}

const OPERATION_COLUMNS: &str =
    "id, kind, state, zones, plan, abort_requested, message, created_ms, updated_ms, ended_ms";

/// An operation without its journal.
fn operation_from_row(row: &AnyRow) -> Result<Operation> {
    let state: String = row.try_get("state")?;
    Ok(Operation {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        state: OpState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("operation state {state:?}")))?,
        zones: from_json(&row.try_get::<String, _>("zones")?, "operation zones")?,
        plan: from_json(&row.try_get::<String, _>("plan")?, "operation plan")?,
        abort_requested: row.try_get::<i64, _>("abort_requested")? != 0,
        message: row.try_get("message")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        ended_ms: row.try_get("ended_ms")?,
        steps: Vec::new(),
    })
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("encoding JSON: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}
