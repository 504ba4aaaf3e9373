//! Paddock's HTTP load balancer. It is fed a routing table (path prefix → app and zone; each
//! zone's front-ends with their state, weight and the zone's policy) and knows nothing of
//! deployments: the controller decides, the balancer routes and says what it routes by.
//!
//! - [`access_log`]: one JSON line per request, written off the request path.
//! - [`table`]: the table as requests use it, and the policies (round-robin, least-connections,
//!   ratio).
//! - [`upstream`]: a front-end's health, requests in flight and keep-alive connection pool.
//! - [`health`]: active health checks on `/_paddock/health`.
//! - [`proxy`]: one request: checks, routing, forwarding, retries, relaying.
//! - [`guard`]: the request-smuggling guard under hyper.
//! - [`feed`]: tables from the controller (or a file), reports back to it.
//! - [`metrics`]: `/metrics` on the admin port.
//! - [`tls`]: HTTPS on the client port, from PEM files.
//! - [`h2`]: clients that chose HTTP/2: hyper's settings, and their idle connections closed.
//!
//! **Invariants:** a table is applied whole, in one pointer store, and only after every new
//! front-end in it had its first health check; the generation reported to the controller is the
//! one requests are routed by; a front-end in `drain` or `maint` gets no new request from the
//! moment its table is applied; nothing a client sends reaches a front-end before the request
//! passed the checks of [`proxy`] and [`guard`].

pub mod access_log;
pub mod feed;
pub mod guard;
pub mod h1;
pub mod h2;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod sends;
pub mod table;
pub mod tls;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use paddock_api::{AppTraffic, BalancerReport, RoutingTable, UpstreamReport};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::proxy::ProxyConfig;
use crate::table::Table;
use crate::upstream::{HealthConfig, PoolConfig};

/// How long a balancer without a saved table waits for the controller's first table before it
/// takes traffic anyway (answering 503 until a table arrives).
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(5);

/// Where the routing table comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Controller(feed::ControllerLink),
    /// A fixed table, read once at start.
    File(PathBuf),
}

/// Everything `paddock balancer` is configured with, resolved.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// This balancer's name in the farm.
    pub name: String,
    pub listen: SocketAddr,
    /// Where `/metrics` and `/status` are served.
    pub admin: Option<SocketAddr>,
    pub source: Source,
    /// Keeps the last routing table.
    pub data_dir: PathBuf,
    pub health: HealthConfig,
    pub pool: PoolConfig,
    pub proxy: ProxyConfig,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Longest a client may take none of its response's bytes: one that stops reading is cut
    /// off, so that it cannot hold a front-end's request in flight (and a drain) forever.
    pub send_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Most headers in a request.
    pub max_headers: usize,
    /// Event loops (threads) serving clients.
    pub threads: usize,
    /// Whether each event loop is bound to a CPU of its own.
    pub pin_threads: Pinning,
    /// HTTPS on the client port, from these files (read again by [`tls::Certificates::reload`]);
    /// plain HTTP without them.
    pub tls: Option<Arc<tls::Certificates>>,
    /// Where plain HTTP is answered with a redirect to the same address over HTTPS (with
    /// `tls`).
    pub redirect_http: Option<SocketAddr>,
    /// Where each request answered on the client port is logged.
    pub access_log: Option<access_log::AccessLog>,
}

/// Whether the event loops are bound to CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pinning {
    /// Bound when there is one loop per CPU the process may run on (the default layout), free
    /// otherwise. Each loop serves its own connections, so two loops that the scheduler stacks
    /// on one core take turns by whole scheduler ticks (4 ms at 250 Hz) while their
    /// connections wait; bound, that cannot happen.
    #[default]
    Auto,
    /// Loop i bound to the i-th CPU the process may run on (round the CPUs again when there
    /// are more loops).
    On,
    /// The scheduler places the loops.
    Off,
}

/// What every connection shares.
pub struct Shared {
    pub table: ArcSwap<Table>,
    /// The generation of `table`, stored after it (sequentially consistent).
    generation: std::sync::atomic::AtomicI64,
    pub metrics: Metrics,
    pub proxy: ProxyConfig,
    /// Client connections open on each event loop.
    open: Vec<Arc<AtomicUsize>>,
    /// Each event loop's queued sends, which its new connections to front-ends use.
    sends: Vec<std::sync::Mutex<Option<Arc<sends::Sends>>>>,
    /// Stopping or restarting: each response says `Connection: close` and ends its connection.
    closing: AtomicBool,
    /// Turns true with `closing`: HTTP/2 connections then say GOAWAY.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Clients come over HTTPS: what `X-Forwarded-Proto` tells the front-ends.
    pub https: bool,
    pub access_log: Option<access_log::AccessLog>,
    /// Ids for requests that come without one.
    pub(crate) request_ids: paddock_core::request_id::Ids,
}

impl Shared {
    /// The generation of the table requests are routed by.
    pub fn generation(&self) -> i64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the balancer is stopping or restarting: each response ends its connection.
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The current event loop's queued sends (a thread that runs no loop counts as loop 0;
    /// none before the loop started).
    pub(crate) fn sends(&self) -> Option<Arc<sends::Sends>> {
        let slot = self.sends.get(upstream::worker())?;
        slot.lock().ok()?.clone()
    }
}

/// A running balancer: its table and what it reports.
pub struct Balancer {
    pub name: String,
    listen: String,
    admin: Option<String>,
    shared: Arc<Shared>,
    health: HealthConfig,
    pool: PoolConfig,
    /// Applies one table at a time.
    applying: tokio::sync::Mutex<()>,
    /// When this run (and its counts) began, in ms since the epoch.
    started_ms: i64,
}

impl Balancer {
    pub fn generation(&self) -> i64 {
        self.shared.generation()
    }

    /// Applies a table: new front-ends get their first health check, then the whole table
    /// replaces the old one at once.
    pub async fn apply(&self, wire: &RoutingTable) {
        let _one_at_a_time = self.applying.lock().await;
        let previous = self.shared.table.load_full();
        let table = Table::build(wire, &previous, &self.pool);
        // The upstreams that already have a health watcher.
        let known: Vec<usize> = previous.upstreams().map(|(_, m)| m.upstream.id()).collect();
        let mut first_checks = tokio::task::JoinSet::new();
        for (_, member) in table.upstreams() {
            let upstream = &member.upstream;
            let health = self.health.clone();
            if !known.contains(&upstream.id()) {
                tokio::spawn(health::watch(Arc::downgrade(upstream), health.clone()));
            }
            if !upstream.is_known() && member.state != paddock_api::LbState::Maint {
                let upstream = upstream.clone();
                first_checks.spawn(async move {
                    health::check(&upstream, &health, &mut None).await;
                });
            }
        }
        first_checks.join_all().await;
        let generation = table.generation;
        self.shared.table.store(Arc::new(table));
        self.shared
            .generation
            .store(generation, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(generation, "routing table applied");
    }

    /// The acknowledgement and the upstreams' state, as the controller wants it.
    ///
    /// The generation is read before the in-flight counts, and a request re-reads the
    /// generation after counting itself (all sequentially consistent): so a request either is
    /// in the counts reported with generation G, or it saw G and was routed by it.
    pub fn report(&self) -> BalancerReport {
        let generation = self.shared.generation();
        let table = self.shared.table.load();
        BalancerReport {
            name: self.name.clone(),
            listen: self.listen.clone(),
            admin: self.admin.clone(),
            generation,
            upstreams: table
                .upstreams()
                .map(|(_, m)| UpstreamReport {
                    name: m.upstream.name.clone(),
                    up: m.upstream.is_up(),
                    in_flight: m.upstream.in_flight(),
                })
                .collect(),
            platform: Default::default(),
            apps: Some(
                table
                    .apps()
                    .into_iter()
                    .map(|app| AppTraffic {
                        app: app.to_string(),
                        counts: self.shared.metrics.app_traffic(app),
                    })
                    .collect(),
            ),
            started_ms: self.started_ms,
        }
    }

    /// Whether a front-end this balancer no longer sends new requests to still has some in
    /// flight: the controller is waiting for it to drain, so the next report should not wait.
    pub fn draining(&self) -> bool {
        self.shared
            .table
            .load()
            .upstreams()
            .any(|(_, m)| m.state != paddock_api::LbState::Ready && m.upstream.in_flight() > 0)
    }
}

/// The listening sockets of a balancer: given to [`run`] when a previous process handed them
/// over (else it binds its own), and given back by it for a restart.
#[derive(Debug, Default)]
pub struct Sockets {
    pub listen: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
    pub redirect: Option<std::net::TcpListener>,
}

/// What ends [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop: new connections are refused at once.
    Exit,
    /// Stop to restart in the same process: the listening sockets stay open (connections wait
    /// in their backlog) and [`run`] gives them back.
    Restart,
}

/// Runs a balancer until `stops` says to; then stops accepting and lets the requests in flight
/// finish (at most 30 s), closing each client connection after its current response (hyper's
/// graceful shutdown: `Connection: close`). Gives the listening sockets back for
/// [`Stop::Restart`]; a [`Stop::Exit`] during a restart's drain stops instead. Everything it
/// started has ended when it returns. Call it on a single-threaded runtime: it starts the other
/// `threads - 1` event loops itself.
pub async fn run(
    config: BalancerConfig,
    sockets: Sockets,
    stops: &mut tokio::sync::mpsc::Receiver<Stop>,
) -> anyhow::Result<Option<Sockets>> {
    let listening = match sockets.listen {
        Some(listening) => listening,
        None => listener(config.listen)?,
    };
    listening.set_nonblocking(true)?;
    let admin_listening = side_port(sockets.admin, config.admin, "--admin")?;
    let redirect_listening = side_port(sockets.redirect, config.redirect_http, "--redirect-http")?;
    // Copies of the sockets (the same sockets, other descriptors), kept for a restart.
    let mut kept = Sockets {
        listen: Some(listening.try_clone()?),
        admin: admin_listening
            .as_ref()
            .map(|l| l.try_clone())
            .transpose()?,
        redirect: redirect_listening
            .as_ref()
            .map(|l| l.try_clone())
            .transpose()?,
    };
    let listener = TcpListener::from_std(listening)?;
    let admin_listener = admin_listening.map(TcpListener::from_std).transpose()?;
    let redirect_listener = redirect_listening.map(TcpListener::from_std).transpose()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data folder {}", config.data_dir.display()))?;
    let listen = listener.local_addr()?;
    let metrics = Metrics::new();
    if let Some(access_log) = &config.access_log {
        metrics.count_access_log(access_log.lost());
    }
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let balancer = Arc::new(Balancer {
        started_ms,
        name: config.name.clone(),
        listen: listen.to_string(),
        admin: match &admin_listener {
            Some(l) => Some(l.local_addr()?.to_string()),
            None => None,
        },
        shared: Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::empty()),
            generation: std::sync::atomic::AtomicI64::new(0),
            metrics,
            proxy: config.proxy.clone(),
            https: config.tls.is_some(),
            access_log: config.access_log.clone(),
            request_ids: paddock_core::request_id::Ids::new(&config.name, started_ms),
            open: (0..config.threads.max(1))
                .map(|_| Arc::new(AtomicUsize::new(0)))
                .collect(),
            sends: (0..config.threads.max(1))
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
            closing: AtomicBool::new(false),
            stopping: tokio::sync::watch::Sender::new(false),
        }),
        health: config.health.clone(),
        pool: config.pool.clone(),
        applying: tokio::sync::Mutex::new(()),
    });

    // The tasks that serve this run beside the event loops, ended when it returns.
    let mut background = Vec::new();
    match &config.source {
        Source::File(path) => {
            let table = feed::read_table(path)?;
            balancer.apply(&table).await;
        }
        Source::Controller(link) => {
            let saved = config.data_dir.join("routing.json");
            if saved.exists() {
                match feed::read_table(&saved) {
                    Ok(table) => {
                        tracing::info!(
                            generation = table.generation,
                            "routing by the saved table until the controller answers"
                        );
                        balancer.apply(&table).await;
                    }
                    Err(e) => tracing::warn!("ignoring the saved routing table: {e:#}"),
                }
            }
            let applied = Arc::new(Notify::new());
            let http = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()
                .context("building the controller's HTTP client")?;
            background.push(tokio::spawn(feed::follow(
                balancer.clone(),
                http.clone(),
                link.clone(),
                saved,
                applied.clone(),
            )));
            background.push(tokio::spawn(feed::report(
                balancer.clone(),
                http,
                link.clone(),
                applied,
            )));
            // Give the controller a moment to hand over a first table before taking traffic.
            let deadline = tokio::time::Instant::now() + FIRST_TABLE_WAIT;
            while balancer.generation() == 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    if let Some(admin) = admin_listener {
        tracing::info!("metrics on http://{}/metrics", admin.local_addr()?);
        background.push(tokio::spawn(serve_admin(admin, balancer.clone())));
    }
    let (stop_loops, stopped) = tokio::sync::watch::channel(false);
    // Its connections end like the client port's at a stop, not cut with the background tasks.
    let mut redirecting = None;
    if let Some(redirect) = redirect_listener {
        tracing::info!(
            "redirecting http://{} to https://{listen}",
            redirect.local_addr()?
        );
        redirecting = Some(tokio::spawn(serve_redirect(
            redirect,
            listen.port(),
            http_builder(&config),
            balancer.shared.clone(),
            stopped.clone(),
        )));
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(name = %config.name, "balancing on {scheme}://{listen}");

    // One event loop per thread, each serving the connections handed to it with its own idle
    // connections to the front-ends, so that a request never crosses threads. This loop accepts
    // and hands each new connection to the loop with the fewest open ones.
    // Read before any thread is bound: threads inherit the binding of the one that starts them.
    let cpus = cpus_to_bind(config.pin_threads, balancer.shared.open.len());
    // This thread's binding before loop 0 takes its CPU, put back at the end: a program it
    // `exec`s keeps it, and would count one CPU where the process may use several.
    let unbound = rustix::thread::sched_getaffinity(None).ok();
    // Where to hand a connection, by loop: none for this one, which serves it itself.
    let mut handoffs = vec![None];
    let mut workers = Vec::new();
    for (index, open) in balancer.shared.open.iter().enumerate().skip(1) {
        let (handoff, incoming) = tokio::sync::mpsc::unbounded_channel();
        handoffs.push(Some(handoff));
        let (shared, config, open) = (balancer.shared.clone(), config.clone(), open.clone());
        let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
        workers.push(
            std::thread::Builder::new()
                .name(format!("paddock-balancer-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(index, cpu);
                    }
                    upstream::set_worker(index);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            runtime.block_on(serve_handed(incoming, open, shared, config))
                        }
                        Err(e) => tracing::error!("worker {index}: cannot start its runtime: {e}"),
                    }
                })
                .context("starting a worker thread")?,
        );
    }
    if let Some(&cpu) = cpus.first() {
        pin_to(0, cpu);
    }
    upstream::set_worker(0);
    let main_loop = accept_loop(
        listener,
        handoffs,
        balancer.shared.clone(),
        config.clone(),
        stopped,
    );
    tokio::pin!(main_loop);
    let mut main_done = false;
    let mut why = tokio::select! {
        why = next_stop(stops) => why,
        _ = &mut main_loop => {
            main_done = true;
            Stop::Exit
        }
    };
    match why {
        Stop::Exit => {
            // The last descriptors of the client socket once the loop lets go of its own: new
            // connections are refused (another balancer takes them), not left waiting.
            kept = Sockets::default();
            tracing::info!("stopping: no new connections; letting requests in flight finish");
        }
        Stop::Restart => tracing::info!(
            "restarting: accepting nothing meanwhile (new connections wait); letting requests in flight finish"
        ),
    }
    balancer.shared.closing.store(true, Ordering::Relaxed);
    balancer.shared.stopping.send_replace(true);
    let _ = stop_loops.send(true);
    let draining = std::time::Instant::now();
    // Every loop's connections, this one's and the other threads': a stop asked for meanwhile
    // is heard until the last one ends, wherever the requests in flight are.
    let finished = async {
        if !main_done {
            main_loop.as_mut().await;
        }
        for worker in workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        if let Some(redirecting) = redirecting {
            let _ = redirecting.await;
        }
    };
    tokio::pin!(finished);
    loop {
        tokio::select! {
            _ = &mut finished => break,
            asked = next_stop(stops), if why == Stop::Restart => {
                if asked == Stop::Exit {
                    why = Stop::Exit;
                    kept = Sockets::default();
                    tracing::info!("stopping instead of restarting: no new connections; letting requests in flight finish");
                }
            }
        }
    }
    tracing::info!(
        ms = draining.elapsed().as_millis() as u64,
        "client connections closed"
    );
    for task in background {
        task.abort();
    }
    if let Some(unbound) = unbound
        && !cpus.is_empty()
        && let Err(e) = rustix::thread::sched_setaffinity(None, &unbound)
    {
        tracing::warn!(
            "cannot unbind the main thread from its CPU: {e}; a restarted balancer may count fewer CPUs"
        );
    }
    Ok((why == Stop::Restart).then_some(kept))
}

/// The next stop asked for; none ever when nobody can ask any more.
async fn next_stop(stops: &mut tokio::sync::mpsc::Receiver<Stop>) -> Stop {
    match stops.recv().await {
        Some(stop) => stop,
        None => std::future::pending().await,
    }
}

/// The CPUs to bind the event loops to (loop i to the i-th, round again), or none.
fn cpus_to_bind(pinning: Pinning, loops: usize) -> Vec<usize> {
    match pinning {
        Pinning::Off => Vec::new(),
        Pinning::On => allowed_cpus(),
        Pinning::Auto => {
            let cpus = allowed_cpus();
            if cpus.len() == loops {
                cpus
            } else {
                tracing::debug!(
                    event_loops = loops,
                    cpus = cpus.len(),
                    "event loops not bound: not one per CPU"
                );
                Vec::new()
            }
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(allowed) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|cpu| allowed.is_set(*cpu))
            .collect(),
        Err(e) => {
            tracing::warn!(
                "cannot read the CPUs this process may use ({e}); event loops not bound"
            );
            Vec::new()
        }
    }
}

/// Binds the current thread (event loop `index`) to `cpu`.
fn pin_to(index: usize, cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    match rustix::thread::sched_setaffinity(None, &set) {
        Ok(()) => tracing::info!(event_loop = index, cpu, "event loop bound to its CPU"),
        Err(e) => tracing::warn!(
            event_loop = index,
            cpu,
            "binding the event loop to its CPU failed: {e}"
        ),
    }
}

/// A listening socket on `addr`. `SO_REUSEPORT`: a new balancer can start on the port while the
/// one it replaces still finishes its requests.
fn listener(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let listener = socket.listen(1024)?;
    Ok(listener.into_std()?)
}

/// A client connection on its way to the event loop that serves it.
type Handoff = tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>;

/// The hyper settings of client connections.
fn http_builder(config: &BalancerConfig) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    // Flattened writes: one `write` per response instead of a `writev` of head and body.
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_header_size(config.max_header_bytes)
        .keep_alive(true)
        .writev(false);
    if config.max_headers != 100 {
        http.max_headers(config.max_headers);
    }
    http
}

/// What one event loop gives each client connection it serves.
struct Serving {
    http: hyper::server::conn::http1::Builder,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    sends: Arc<sends::Sends>,
}

impl Serving {
    /// The current event loop's, which it also gives the loop's connections to front-ends.
    fn new(config: &BalancerConfig, shared: &Shared) -> Serving {
        let sends = sends::Sends::start(config.send_timeout);
        if let Some(Ok(mut slot)) = shared.sends.get(upstream::worker()).map(|s| s.lock()) {
            *slot = Some(sends.clone());
        }
        Serving {
            http: http_builder(config),
            graceful: hyper_util::server::graceful::GracefulShutdown::new(),
            sends,
        }
    }
}

/// Serves one client connection on the current event loop, after its TLS handshake when the
/// port speaks HTTPS; `open` (counted by the accepting loop already) goes down when it ends.
fn serve(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    config: &BalancerConfig,
    serving: &Serving,
    open: &Arc<AtomicUsize>,
) {
    let _ = stream.set_nodelay(true);
    let stream = serving.sends.client(stream);
    let progress = stream.progress();
    let client = Client {
        peer,
        shared: shared.clone(),
        http: serving.http.clone(),
        watcher: serving.graceful.watcher(),
        max_header_bytes: config.max_header_bytes,
        send_timeout: config.send_timeout,
        progress,
        idle: config.header_timeout,
    };
    let open = open.clone();
    let Some(tls) = config.tls.as_ref().map(|t| t.config()) else {
        tokio::spawn(async move {
            client.serve(stream).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
        return;
    };
    // The handshake has the time a client has to send its headers.
    let handshake_timeout = config.header_timeout;
    tokio::spawn(async move {
        let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
        match tokio::time::timeout(handshake_timeout, handshake).await {
            Ok(Ok(stream)) => {
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    client.serve_h2(stream).await
                } else {
                    client.serve(stream).await
                }
            }
            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
            Err(_) => {
                tracing::debug!(%peer, "no TLS handshake within {handshake_timeout:?}; closed")
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    });
}

/// What serving one client connection needs, taken from its event loop.
struct Client {
    peer: SocketAddr,
    shared: Arc<Shared>,
    http: hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    max_header_bytes: usize,
    send_timeout: Duration,
    /// Bytes the client's socket took (see [`sends::Stream::progress`]).
    progress: Arc<std::sync::atomic::AtomicU64>,
    /// Longest an HTTP/2 connection stays open with no request in progress (an HTTP/1.1 one
    /// waits as long for its next request's head).
    idle: Duration,
}

impl Client {
    /// The client's address as `X-Forwarded-For` gives it (made once per connection).
    fn peer_ip(&self) -> http::HeaderValue {
        http::HeaderValue::from_str(&self.peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"))
    }

    /// Serves its requests until the connection ends (or a stop ends it after a response).
    async fn serve<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let suspect = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(guard::Guarded::new(
            stream,
            self.max_header_bytes,
            self.send_timeout,
            self.progress.clone(),
            suspect.clone(),
        ));
        let peer_ip = self.peer_ip();
        let shared = self.shared;
        let service = service_fn(move |request| {
            proxy::handle(
                request,
                shared.clone(),
                peer_ip.clone(),
                Some(suspect.clone()),
            )
        });
        let connection = self.watcher.watch(self.http.serve_connection(io, service));
        if let Err(e) = connection.await {
            tracing::debug!(peer = %self.peer, "client connection ended: {e}");
        }
    }

    /// Serves an HTTP/2 connection (chosen in the TLS handshake): each stream is a request of
    /// its own, on this event loop, forwarded to the front-ends over HTTP/1.1 like any other.
    async fn serve_h2<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(guard::Guarded::unscanned(
            stream,
            self.send_timeout,
            self.progress.clone(),
        ));
        let peer_ip = self.peer_ip();
        let mut stopping = self.shared.stopping.subscribe();
        let shared = self.shared;
        let streams = h2::Streams::new();
        let service = service_fn({
            let streams = streams.clone();
            move |request| {
                let stream = streams.start();
                // No framing to watch: HTTP/2 frames each message itself.
                let handled = proxy::handle(request, shared.clone(), peer_ip.clone(), None);
                async move {
                    let Ok(response) = handled.await;
                    h2::Answer::Ok(response.map(|body| h2::Counted { body, stream }))
                }
            }
        });
        let http = h2::builder(self.max_header_bytes);
        let connection = http.serve_connection(io, service);
        tokio::pin!(connection);
        // Held until the connection ends: the loop's stop waits for it as for a watched one.
        let _watcher = self.watcher;
        // A stop, or no request in progress for as long as an HTTP/1.1 connection may wait for
        // its next one: GOAWAY, the streams in progress finish, then the connection closes.
        // Responses the client takes nothing of for the send timeout: closed at once.
        let mut closing = false;
        let watch = streams.watch(self.idle, self.send_timeout);
        tokio::pin!(watch);
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %self.peer, "HTTP/2 client connection ended: {e}");
                    }
                    return;
                }
                close = &mut watch => match close {
                    h2::Close::Stalled => {
                        tracing::debug!(peer = %self.peer, "HTTP/2 client took nothing for {:?}: closed", self.send_timeout);
                        return;
                    }
                    h2::Close::Idle => {
                        if !std::mem::replace(&mut closing, true) {
                            connection.as_mut().graceful_shutdown();
                        }
                        // Watched again: a client that stalls the last responses is cut off.
                        watch.set(streams.watch(Duration::MAX, self.send_timeout));
                    }
                },
                _ = stopping.wait_for(|stop| *stop), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Accepts client connections until `stopped` turns true, serving each on the event loop with
/// the fewest open ones; then lets the requests in flight on this loop finish (at most 30 s).
async fn accept_loop(
    listener: TcpListener,
    handoffs: Vec<Option<Handoff>>,
    shared: Arc<Shared>,
    config: BalancerConfig,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let serving = Serving::new(&config, &shared);
    let mut last_warned = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Said once in a while: it repeats every 50 ms while it lasts.
                    if last_warned.is_none_or(|at: std::time::Instant| at.elapsed() > Duration::from_secs(5)) {
                        last_warned = Some(std::time::Instant::now());
                        match rustix::io::Errno::from_io_error(&e) {
                            Some(rustix::io::Errno::MFILE) => tracing::error!(
                                "accept failed: {e}: this balancer has as many connections open as its open files limit allows (two per client); new clients wait in the backlog until some close. Raise the limit (systemd: LimitNOFILE=65536)"
                            ),
                            Some(rustix::io::Errno::NFILE) => tracing::error!(
                                "accept failed: {e}: the machine has as many files open as it allows (fs.file-max); new clients wait in the backlog until some close. Raise fs.file-max, or find what holds the files"
                            ),
                            _ => tracing::warn!("accept failed: {e}"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let Some((open, handoff)) = shared
            .open
            .iter()
            .zip(&handoffs)
            .min_by_key(|(open, _)| open.load(Ordering::Relaxed))
        else {
            continue;
        };
        // Counted now, so that the next choice sees it.
        open.fetch_add(1, Ordering::Relaxed);
        let Some(handoff) = handoff else {
            serve(stream, peer, &shared, &config, &serving, open);
            continue;
        };
        let handed = match stream.into_std() {
            Ok(stream) => handoff
                .send((stream, peer))
                .map_err(|_| "its event loop is gone".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = handed {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("connection from {peer} dropped: handing it over failed: {why}");
        }
    }
    drop(listener);
    // The other loops finish their connections once their hand-off channel closes.
    drop(handoffs);
    let open = shared.open[0].clone();
    finish_connections(serving.graceful, &open).await;
}

/// How long a stopping balancer keeps an idle client connection open for its next request
/// (answered with `Connection: close`) before closing it: a client that sends at once never
/// meets a connection closed under its request, and one idle for longer meets what any
/// keep-alive timeout does.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// Ends the client connections of this loop: each one after its next response, or once idle
/// past [`CLOSE_GRACE`]; requests in flight finish (at most 30 s).
async fn finish_connections(
    graceful: hyper_util::server::graceful::GracefulShutdown,
    open: &AtomicUsize,
) {
    let grace = tokio::time::Instant::now() + CLOSE_GRACE;
    while open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after 30 s; stopping anyway");
    }
}

/// The loop of a worker thread: serves the connections handed to it until the accepting loop
/// stops, then lets the requests in flight finish (at most 30 s).
async fn serve_handed(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    open: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    config: BalancerConfig,
) {
    let serving = Serving::new(&config, &shared);
    while let Some((stream, peer)) = incoming.recv().await {
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => serve(stream, peer, &shared, &config, &serving, &open),
            Err(e) => {
                open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("taking over a connection from {peer} failed: {e}");
            }
        }
    }
    finish_connections(serving.graceful, &open).await;
}

/// A port beside the client port (admin, redirect): the one handed over, or a new one bound at
/// `addr` (named by `flag` when that fails), or none; non-blocking.
fn side_port(
    handed: Option<std::net::TcpListener>,
    addr: Option<SocketAddr>,
    flag: &str,
) -> anyhow::Result<Option<std::net::TcpListener>> {
    let listening = match (handed, addr) {
        (Some(handed), _) => handed,
        (None, Some(addr)) => std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} ({flag})"))?,
        (None, None) => return Ok(None),
    };
    listening.set_nonblocking(true)?;
    Ok(Some(listening))
}

/// The plain-HTTP port of a balancer serving HTTPS (`--redirect-http`): every request is
/// answered `308 Permanent Redirect` to the same host, path and query over HTTPS on
/// `https_port`; a request without a usable `Host` gets 400. Nothing reaches a front-end.
/// Once `stopped`, it accepts nothing more and ends its connections as the client port does
/// (`Connection: close` on each answer, idle ones closed after [`CLOSE_GRACE`]).
async fn serve_redirect(
    listener: TcpListener,
    https_port: u16,
    http: hyper::server::conn::http1::Builder,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let closing = shared.closing.load(Ordering::Relaxed);
            async move {
                let mut response = redirect_to_https(&request, https_port);
                if closing {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    finish_connections(graceful, &open).await;
}

/// The answer of the redirect port to one request.
fn redirect_to_https<B>(request: &http::Request<B>, https_port: u16) -> Response<Full<Bytes>> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = host.and_then(|host| {
        let port = match https_port {
            443 => String::new(),
            port => format!(":{port}"),
        };
        http::HeaderValue::from_str(&format!("https://{}{port}{target}", host.host())).ok()
    });
    let (status, body) = match &location {
        Some(location) => (
            StatusCode::PERMANENT_REDIRECT,
            format!(
                "this site is served over HTTPS: {}\n",
                location.to_str().unwrap_or_default()
            ),
        ),
        None => (
            StatusCode::BAD_REQUEST,
            "a Host header naming this site is needed to send you to it over HTTPS\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The admin port: `/metrics` (Prometheus text), `/status` (the report sent to the controller).
async fn serve_admin(listener: TcpListener, balancer: Arc<Balancer>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let balancer = balancer.clone();
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let balancer = balancer.clone();
            async move {
                let (status, content_type, body) = match request.uri().path() {
                    "/metrics" => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        balancer.shared.metrics.render(
                            &balancer.shared.table.load(),
                            &balancer
                                .shared
                                .open
                                .iter()
                                .map(|open| open.load(Ordering::Relaxed))
                                .collect::<Vec<_>>(),
                        ),
                    ),
                    "/status" => (
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_string_pretty(&balancer.report()).unwrap_or_default(),
                    ),
                    _ => (
                        StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "the admin port serves /metrics and /status\n".to_string(),
                    ),
                };
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(host: Option<&str>, target: &str, https_port: u16) -> (u16, Option<String>) {
        let mut request = http::Request::get(target);
        if let Some(host) = host {
            request = request.header(header::HOST, host);
        }
        let response = redirect_to_https(&request.body(()).unwrap(), https_port);
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|l| l.to_str().unwrap().to_string());
        (response.status().as_u16(), location)
    }

    #[test]
    fn plain_http_is_sent_to_the_same_host_and_path_over_https() {
        assert_eq!(
            redirect(Some("shop.example"), "/cart?item=3", 443),
            (308, Some("https://shop.example/cart?item=3".into()))
        );
        // The port of the HTTP request is not the HTTPS one.
        assert_eq!(
            redirect(Some("shop.example:8080"), "/", 8443),
            (308, Some("https://shop.example:8443/".into()))
        );
        assert_eq!(
            redirect(Some("[::1]:80"), "/a", 443),
            (308, Some("https://[::1]/a".into()))
        );
        assert_eq!(redirect(None, "/a", 443), (400, None));
        assert_eq!(redirect(Some("bad host"), "/a", 443), (400, None));
    }
}
