//! One front-end as the balancer sees it: its health, the apps it reports, its requests in flight
//! and its pool of keep-alive connections.
//!
//! An `Upstream` outlives routing tables: a new table that lists the same name at the same
//! address reuses it, with its health and its connections.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::h1::Connection;
use crate::sends::Sends;
use arc_swap::ArcSwap;

/// Connection and pool settings shared by every upstream.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// Idle keep-alive connections are dropped after this long. Shorter than the front-end's own
    /// idle limit (30 s), so that the balancer never sends on a connection the server is closing.
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream and per worker thread.
    pub max_idle: usize,
    /// Worker threads: each has its own idle connections, so that a connection is only ever
    /// used by the thread whose event loop drives it.
    pub workers: usize,
}

thread_local! {
    /// The index of the worker thread this is (0 for the main one).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `index`.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The index of the worker (event loop) this thread runs.
pub(crate) fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// Health-check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down server back.
    pub rise: u32,
    /// Consecutive failures that take an up server out.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
        }
    }
}

pub struct Upstream {
    pub name: String,
    /// The name, shared by the metrics of its requests.
    pub label: Arc<String>,
    pub address: String,
    up: AtomicBool,
    health: Mutex<Health>,
    /// The apps its last health report listed.
    apps: ArcSwap<Vec<String>>,
    /// The version its last response named (`x-paddock-version`), as a metrics label.
    version: ArcSwap<String>,
    /// Requests this balancer sent it that are not finished yet.
    in_flight: AtomicU64,
    /// Set while the routing table says `maint`: no traffic and no health checks.
    pub(crate) maint: AtomicBool,
    /// One pool per worker thread.
    idle: Vec<Mutex<Vec<Idle>>>,
    pool: PoolConfig,
}

#[derive(Default)]
struct Health {
    /// False until the first check: a new server joins on its first success.
    known: bool,
    successes: u32,
    failures: u32,
}

struct Idle {
    conn: Connection,
    since: Instant,
}

impl Upstream {
    pub fn new(name: String, address: String, pool: PoolConfig) -> Upstream {
        Upstream {
            label: Arc::new(name.clone()),
            name,
            address,
            up: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            apps: ArcSwap::from_pointee(Vec::new()),
            version: ArcSwap::from_pointee(String::new()),
            in_flight: AtomicU64::new(0),
            maint: AtomicBool::new(false),
            idle: (0..pool.workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            pool,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether its health has been checked at least once.
    pub fn is_known(&self) -> bool {
        self.health.lock().map(|h| h.known).unwrap_or(false)
    }

    pub fn serves(&self, app: &str) -> bool {
        self.apps.load().iter().any(|a| a == app)
    }

    /// Its identity: the same for as long as tables keep it (same name and address).
    pub fn id(&self) -> usize {
        self as *const Upstream as usize
    }

    /// Sequentially consistent with [`Shared::generation`](crate::Shared::generation): see
    /// [`crate::Balancer::report`].
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Back to the state of a new upstream: down until its next check passes.
    pub fn forget_health(&self) {
        if let Ok(mut h) = self.health.lock() {
            *h = Health::default();
        }
        self.up.store(false, Ordering::Release);
        self.drop_idle();
    }

    /// An active check passed; `apps` is what the server reported serving.
    pub fn check_passed(&self, apps: Vec<String>, rise: u32) {
        self.apps.store(Arc::new(apps));
        let Ok(mut h) = self.health.lock() else {
            return;
        };
        h.failures = 0;
        h.successes = h.successes.saturating_add(1);
        if !self.is_up() && (!h.known || h.successes >= rise) {
            self.up.store(true, Ordering::Release);
            tracing::info!(upstream = %self.name, address = %self.address, "up: health checks pass");
        }
        h.known = true;
    }

    /// An active check failed.
    pub fn check_failed(&self, why: &str, fall: u32) {
        let Ok(mut h) = self.health.lock() else {
            return;
        };
        h.successes = 0;
        h.failures = h.failures.saturating_add(1);
        let first = !std::mem::replace(&mut h.known, true);
        if first || (self.is_up() && h.failures >= fall) {
            self.up.store(false, Ordering::Release);
            tracing::warn!(upstream = %self.name, address = %self.address, "down: {why}");
            self.drop_idle();
        }
    }

    /// A request could not reach it (connect failure, reset before any response byte): down at
    /// once; it comes back after `rise` passing checks.
    pub fn failed_passively(&self, why: &str) {
        if let Ok(mut h) = self.health.lock() {
            h.known = true;
            h.successes = 0;
            h.failures = h.failures.saturating_add(1);
        }
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(upstream = %self.name, address = %self.address, "down at once: {why}");
        }
        self.drop_idle();
    }

    fn drop_idle(&self) {
        for pool in &self.idle {
            if let Ok(mut idle) = pool.lock() {
                idle.clear();
            }
        }
    }

    fn own_pool(&self) -> Option<&Mutex<Vec<Idle>>> {
        let worker = worker();
        self.idle.get(worker).or(self.idle.first())
    }

    /// The metrics label of a version its responses name: the same one as long as it serves
    /// the same version.
    pub fn version_label(&self, version: &[u8]) -> Arc<String> {
        let last = self.version.load();
        if last.as_bytes() == version {
            return Arc::clone(&last);
        }
        let label = Arc::new(String::from_utf8_lossy(version).into_owned());
        self.version.store(label.clone());
        label
    }

    /// A pooled connection (`reused` set), if one is open. `now`: about now.
    pub fn checkout(&self, now: Instant) -> Option<Connection> {
        let mut idle = self.own_pool()?.lock().ok()?;
        while let Some(entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < self.pool.idle_timeout
                && entry.conn.is_open()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Opens a new connection (the pool is not looked at), whose small writes are queued on
    /// `sends` when given (the current event loop's: [`crate::sends`]).
    pub async fn connect(&self, sends: Option<&Arc<Sends>>) -> std::io::Result<Connection> {
        Connection::connect(&self.address, self.pool.connect_timeout, sends).await
    }

    /// Gives a connection back once its exchange is complete (`now`).
    pub fn checkin(&self, conn: Connection, now: Instant) {
        if !self.is_up() {
            return;
        }
        if let Some(pool) = self.own_pool()
            && let Ok(mut idle) = pool.lock()
            && idle.len() < self.pool.max_idle
        {
            idle.push(Idle { conn, since: now });
        }
    }
}

/// A request counted in flight on an upstream.
pub struct InFlight(Arc<Upstream>);

impl InFlight {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection to a front-end could not be opened when the cause is on this machine (out of
/// descriptors, ports or socket memory), which says nothing of the front-end's health: what to
/// raise. `None` for any other failure.
pub fn shortage(e: &std::io::Error) -> Option<&'static str> {
    use rustix::io::Errno;
    match Errno::from_io_error(e)? {
        Errno::MFILE => Some(
            "this balancer has as many files open as its open files limit allows; raise it (systemd: LimitNOFILE=65536)",
        ),
        Errno::NFILE => Some(
            "the machine has as many files open as it allows; raise fs.file-max, or find what holds the files",
        ),
        Errno::ADDRNOTAVAIL => Some(
            "no local port is free for a new connection; widen net.ipv4.ip_local_port_range, or find what holds the ports",
        ),
        Errno::NOBUFS | Errno::NOMEM => Some("the machine is out of memory for sockets"),
        _ => None,
    }
}

/// Logs a [`shortage`], once every 5 s at most: while it lasts, every request would say it.
pub fn warn_shortage(e: &std::io::Error, hint: &str) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let Ok(mut last) = LAST.lock() else {
        return;
    };
    if last.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
        *last = Some(Instant::now());
        tracing::error!("cannot open a connection to a front-end: {e}: {hint}");
    }
}
