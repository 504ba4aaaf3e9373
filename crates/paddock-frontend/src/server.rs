//! The HTTP side of a front-end: accept, route, serve, health, graceful shutdown.
//!
//! A request's life: look up its path in the route table → take the app version's `Arc` → count
//! it in flight → run it on a fresh instance → add `x-paddock-*` headers → stream the body → the
//! in-flight count drops when the body has been sent (or the client went away).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use paddock_api::HealthReport;
use paddock_core::ServerState;
use paddock_runtime::{AppData, RequestData};
use tokio::net::TcpListener;

use crate::FrontendConfig;
use crate::apps::Apps;
use crate::data;
use crate::responses::{self, Lookup, ResponseCache};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

const HEALTH_PATH: &str = "/_paddock/health";
/// Time a client has to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    server_header: HeaderValue,
    apps: Arc<Apps>,
    vitals: Arc<Vitals>,
    /// Ids of requests that come without one.
    request_ids: paddock_core::request_id::Ids,
    /// The apps' data and sessions, if this front-end was given the farm's database.
    app_data: Option<Arc<dyn AppData>>,
    /// Session cookies are `Secure` (users reach the farm over HTTPS).
    secure_cookies: bool,
    /// The response cache, if this front-end keeps one.
    cache: Option<Arc<ResponseCache>>,
    /// The farm's purge log, where the purges its apps ask for go.
    purge_log: Option<Arc<paddock_store::SqlStore>>,
    /// `server NAME`: who wrote a purge, in the log.
    purge_source: String,
}

/// What the front-end reports about itself: its state and its requests in flight. Shared by the
/// server (which changes them) and the health report and heartbeat (which read them).
pub struct Vitals {
    name: String,
    state: AtomicU8,
    in_flight: AtomicU64,
    /// What the deployment service could not load in its last attempt.
    failed: std::sync::Mutex<Vec<paddock_api::LoadFailure>>,
    /// The platform build this process runs, or is installing, or could not install.
    platform: Arc<crate::upgrade::BuildStatus>,
    /// Names this process among the server's restarts (PID and start time).
    incarnation: String,
    /// The response cache, whose figures the report carries.
    cache: std::sync::OnceLock<Arc<ResponseCache>>,
}

impl Vitals {
    pub fn new(name: &str) -> Vitals {
        Vitals {
            name: name.to_string(),
            state: AtomicU8::new(0),
            in_flight: AtomicU64::new(0),
            failed: std::sync::Mutex::new(Vec::new()),
            platform: Arc::default(),
            incarnation: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ),
            cache: std::sync::OnceLock::new(),
        }
    }

    /// Reports this cache's figures from now on.
    pub fn set_cache(&self, cache: Arc<ResponseCache>) {
        let _ = self.cache.set(cache);
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    pub fn platform(&self) -> &Arc<crate::upgrade::BuildStatus> {
        &self.platform
    }

    pub fn report(&self, apps: &Apps) -> HealthReport {
        HealthReport {
            server: self.name.clone(),
            state: self.state(),
            apps: apps.loaded(),
            in_flight: self.in_flight.load(Ordering::Acquire),
            failed: self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            build: self.platform.build(),
            upgrade_error: self.platform.upgrade_error(),
            installing: self.platform.installing(),
            incarnation: Some(self.incarnation.clone()),
            cache: self.cache.get().map(|cache| cache.report()),
        }
    }

    /// Records what the last attempt to apply the desired state could not load.
    pub fn set_failed(&self, failed: Vec<paddock_api::LoadFailure>) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = failed;
    }

    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Acquire) {
            0 => ServerState::Serving,
            1 => ServerState::Draining,
            _ => ServerState::Stopping,
        }
    }

    pub fn set_state(&self, state: ServerState) {
        let raw = match state {
            ServerState::Serving => 0,
            ServerState::Draining => 1,
            ServerState::Stopping => 2,
        };
        self.state.store(raw, Ordering::Release);
    }
}

impl Server {
    pub async fn bind(
        config: &FrontendConfig,
        apps: Arc<Apps>,
        vitals: Arc<Vitals>,
        data: Data,
    ) -> anyhow::Result<Server> {
        let handed_over = config
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let listener = match handed_over {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?,
        };
        let server_header = HeaderValue::from_str(&config.name).map_err(|_| {
            anyhow::anyhow!("server name {:?} cannot be sent in a header", config.name)
        })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                server_header,
                apps,
                vitals,
                request_ids: paddock_core::request_id::Ids::new(
                    &config.name,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                ),
                app_data: data.app_data,
                secure_cookies: config.secure_cookies,
                cache: data.cache,
                purge_log: data.purge_log,
                purge_source: format!("server {}", config.name),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves until `shutdown` resolves. Then reports `stopping` (health answers 503) while
    /// still serving for the drain delay it says, so that load balancers notice; then stops
    /// accepting, lets the requests in flight finish (at most `drain_timeout`) and closes every
    /// connection. Returns the listening socket, still open, when `shutdown` said to hand it
    /// over (connections arriving meanwhile wait for the next process).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = Stop> + Send,
        drain_timeout: Duration,
    ) -> anyhow::Result<Option<std::net::TcpListener>> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        tokio::pin!(shutdown);
        let mut stop_accepting_at: Option<tokio::time::Instant> = None;
        let mut hand_over = false;
        let mut last_warned = None;
        loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
            let (stream, _peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, keep serving, and
                        // say so once in a while (it repeats every 50 ms while it lasts).
                        if last_warned.is_none_or(|at: std::time::Instant| at.elapsed() > Duration::from_secs(5)) {
                            last_warned = Some(std::time::Instant::now());
                            warn_accept_failed(&e);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                stop = &mut shutdown, if stop_accepting_at.is_none() => {
                    let drain_delay = stop.drain_delay;
                    hand_over = stop.hand_over;
                    self.shared.vitals.set_state(ServerState::Stopping);
                    tracing::info!(
                        "stopping: health answers 503, still serving for {:.1} s (--drain-delay)",
                        drain_delay.as_secs_f64()
                    );
                    stop_accepting_at = Some(tokio::time::Instant::now() + drain_delay);
                    continue;
                }
                () = tokio::time::sleep_until(stop_accepting_at.unwrap_or(far)), if stop_accepting_at.is_some() => break,
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, req).await) }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("connection ended: {e}");
                }
            });
        }

        self.shared.vitals.set_state(ServerState::Stopping);
        let kept = if hand_over {
            Some(self.listener.into_std()?)
        } else {
            drop(self.listener);
            None
        };
        let in_flight = self.shared.vitals.in_flight.load(Ordering::Acquire);
        tracing::info!(
            in_flight,
            "stopping: no new connections, finishing requests in flight"
        );
        match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
            Ok(()) => tracing::info!("stopped: every request answered"),
            Err(_) => tracing::warn!(
                in_flight = self.shared.vitals.in_flight.load(Ordering::Acquire),
                "stopped after {}s with requests still running",
                drain_timeout.as_secs()
            ),
        }
        Ok(kept)
    }
}

/// What a server keeps beside the apps: their data, its response cache, the farm's purge log.
#[derive(Default)]
pub struct Data {
    pub app_data: Option<Arc<dyn AppData>>,
    pub cache: Option<Arc<ResponseCache>>,
    pub purge_log: Option<Arc<paddock_store::SqlStore>>,
}

/// How [`Server::serve`] stops.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    /// How long it keeps serving while its health answers 503.
    pub drain_delay: Duration,
    /// Keep the listening socket open and return it (for the process that replaces this one).
    pub hand_over: bool,
}

/// An accept that failed, explained: running out of descriptors is the usual cause, and what to
/// raise depends on whose limit it is.
fn warn_accept_failed(e: &std::io::Error) {
    match rustix::io::Errno::from_io_error(e) {
        Some(rustix::io::Errno::MFILE) => tracing::error!(
            "accept failed: {e}: this front-end has as many files open as its open files limit allows (one per client connection, the balancers' pooled ones included); new connections wait in the backlog until some close. Raise the limit (systemd: LimitNOFILE=65536)"
        ),
        Some(rustix::io::Errno::NFILE) => tracing::error!(
            "accept failed: {e}: the machine has as many files open as it allows (fs.file-max); new connections wait in the backlog until some close. Raise fs.file-max, or find what holds the files"
        ),
        _ => tracing::warn!("accept failed: {e}"),
    }
}

async fn handle(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path == HEALTH_PATH && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return with_server(shared, health(shared));
    }
    if paddock_core::route_matches(paddock_core::route::RESERVED_PREFIX, path) {
        return with_server(shared, text(StatusCode::NOT_FOUND, "not found\n"));
    }
    let Some(route) = shared.apps.table().lookup(path).cloned() else {
        return with_server(shared, text(StatusCode::NOT_FOUND, "not found\n"));
    };

    let spec = route.version.spec();
    // The id the balancer gave the request (or a client, through it), else one of this
    // server's: the app's log lines and its `PADDOCK_REQUEST_ID` carry it, the answer says it.
    let request_id = match req
        .headers()
        .get(paddock_core::request_id::HEADER)
        .filter(|id| paddock_core::request_id::is_valid(id.as_bytes()))
    {
        Some(id) => id.clone(),
        None => HeaderValue::try_from(shared.request_ids.next())
            .unwrap_or(HeaderValue::from_static("-")),
    };
    let session = shared
        .app_data
        .as_ref()
        .map(|_| data::session(req.headers(), spec));
    data::strip_request_cookies(req.headers_mut());
    // The response cache answers before anything runs; not a request of a user with a session
    // in the app (the app may answer it for that user).
    let cached = shared
        .cache
        .as_ref()
        .filter(|_| !session.as_ref().is_some_and(|s| s.has_cookie()))
        .and_then(|cache| {
            let key = responses::Key::of(route.version.serial(), &req)?;
            Some((cache, key))
        });
    let mut ticket = None;
    if let Some((cache, key)) = &cached {
        match cache.lookup(key, req.headers()) {
            Lookup::Hit(entry) => {
                let mut response = entry.response();
                if let Some((app, version)) = route.headers {
                    let headers = response.headers_mut();
                    headers.insert("x-paddock-app", app);
                    headers.insert("x-paddock-version", version);
                }
                response
                    .headers_mut()
                    .insert(paddock_core::request_id::HEADER, request_id);
                return with_server(shared, response);
            }
            // A HEAD's answer has no body to keep.
            Lookup::Miss(t) if req.method() == Method::GET => ticket = Some(t),
            Lookup::Miss(_) => {}
            Lookup::Off => {}
        }
    }

    let guard = InFlight::enter(shared.clone());
    let request_id_text = request_id.to_str().unwrap_or("-");
    // What `Vary` may name, as the app saw it (and as the lookup did).
    let request_headers = ticket.map(|_| req.headers().clone());
    let request_data = shared.app_data.as_ref().map(|store| RequestData {
        store: store.clone(),
        session: session.clone(),
    });
    // A session cookie is `Secure` when users reach the farm over HTTPS: always with
    // `--secure-cookies`, else when the balancer says this request came over HTTPS.
    let secure_cookie =
        shared.secure_cookies || session.is_some() && data::came_over_https(req.headers());
    let served = shared
        .apps
        .runtime()
        .serve(&route.version, req, request_id_text, request_data)
        .await;
    let mut response = match served {
        Ok(mut response) => {
            data::strip_response_cookies(response.headers_mut());
            let purges = take_all(response.headers_mut(), paddock_core::cache::PURGE_HEADER);
            let tags = take_all(response.headers_mut(), paddock_core::cache::TAG_HEADER);
            if !purges.is_empty() {
                app_purges(shared, &spec.name, &purges).await;
            }
            // A session the app started or used before its head goes out with the head.
            let cookie = session.as_ref().and_then(|session| {
                data::set_cookie(spec, session.cookie()?, session.idle(), secure_cookie)
            });
            if let Some(cookie) = cookie {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            let response = response.map(|body| {
                TrackedBody {
                    inner: body,
                    _guard: guard,
                }
                .boxed_unsync()
            });
            let keep = ticket.and_then(|_| responses::keep(response.status(), response.headers()));
            match (cached, ticket, keep, request_headers) {
                (Some((cache, key)), Some(ticket), Some(keep), Some(request)) => cache.record(
                    ticket,
                    key,
                    Arc::from(spec.name.as_str()),
                    keep,
                    &request,
                    response,
                    app_tags(&spec.name, &tags),
                ),
                _ => response,
            }
        }
        Err(e) => {
            let mut r = text(e.status(), &format!("{e} (request {request_id_text})\n"));
            if e.status() == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    };
    if let Some((app, version)) = route.headers {
        let headers = response.headers_mut();
        headers.insert("x-paddock-app", app);
        headers.insert("x-paddock-version", version);
    }
    response
        .headers_mut()
        .insert(paddock_core::request_id::HEADER, request_id);
    with_server(shared, response)
}

/// Removes every value of a header and returns them.
fn take_all(headers: &mut http::HeaderMap, name: &'static str) -> Vec<HeaderValue> {
    match headers.entry(name) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => Vec::new(),
    }
}

/// The most tags one answer may name, to tag its response or to purge.
const MAX_TAGS: usize = 64;

/// The valid tags of an app's header values; the others are logged and left out.
fn app_tags(app: &str, values: &[HeaderValue]) -> Vec<Box<str>> {
    let mut tags = Vec::new();
    for value in values {
        let Ok(value) = value.to_str() else {
            tracing::warn!(app, "cache tags that are not ASCII ignored");
            continue;
        };
        for tag in paddock_core::cache::tags(value) {
            if tag == "*" {
                tags.push(Box::from(tag));
            } else if let Some(problem) = paddock_core::cache::tag_problem(tag) {
                tracing::warn!(app, "{problem}: ignored");
            } else if tags.len() < MAX_TAGS {
                tags.push(Box::from(tag));
            } else {
                tracing::warn!(
                    app,
                    "more than {MAX_TAGS} cache tags in one answer: {tag} ignored"
                );
            }
        }
    }
    tags
}

/// Carries out the purge an app's answer asks for: here at once, then on every front-end
/// through the farm's purge log (written before the answer goes out).
async fn app_purges(shared: &Shared, app: &str, values: &[HeaderValue]) {
    let mut tags: Vec<String> = app_tags(app, values)
        .into_iter()
        .map(String::from)
        .collect();
    if tags.iter().any(|t| t == "*") {
        tags.clear();
    } else if tags.is_empty() {
        return;
    }
    if let Some(cache) = &shared.cache {
        let named: Vec<&str> = tags.iter().map(String::as_str).collect();
        cache.purge(app, &named);
    }
    if let Some(log) = &shared.purge_log {
        let written = log.cache_purge_add(app, &tags, &shared.purge_source).await;
        match (written, &shared.cache) {
            // Applied here already: not again when this server reads them in the log.
            (Ok(ids), Some(cache)) => cache.written(&ids),
            (Ok(_), None) => {}
            (Err(e), _) => tracing::warn!(
                app,
                ?tags,
                "purge not written to the farm's purge log: other front-ends keep those responses until they expire: {e}"
            ),
        }
    }
}

fn health(shared: &Shared) -> Response<Body> {
    let report = shared.vitals.report(&shared.apps);
    let status = if report.state.is_routable() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_vec(&report).unwrap_or_default();
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn with_server(shared: &Shared, mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert("x-paddock-server", shared.server_header.clone());
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Counts a request in flight from routing until its response body is done or dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: Arc<Shared>) -> InFlight {
        shared.vitals.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.vitals.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An app's response body that keeps its request counted in flight until it ends.
struct TrackedBody {
    inner: paddock_runtime::ResponseBody,
    _guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
