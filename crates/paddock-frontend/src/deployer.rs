//! The deployment service: brings this front-end in line with the controller's desired state.
//!
//! It registers, then long-polls `/control/v1/desired/<name>?after=<generation>` (no busy
//! polling: the controller answers when the generation moves, or after its long-poll time), and
//! for each app version it should serve and does not, fetches the artifact (from the local cache,
//! else from the controller, checked against its sha256), loads it and swaps it in. Apps no longer
//! desired are undeployed. A heartbeat (the health report) goes to the controller every second and
//! right after every change, so that "deployed" is a fact the controller can see.
//!
//! With its deployment flag off it keeps what it has and takes nothing new; switched on, the
//! generation moves and it catches up at once. The last applied desired state is kept in
//! `<data>/desired.json`: at start the front-end serves it from its artifact cache before it has
//! reached the controller, so a restart while the controller is down still serves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use paddock_api::{Controllers, DesiredApp, DesiredState, Registration};
use paddock_runtime::{AppSpec, sha256_hex};
use tokio::sync::Notify;

use crate::apps::Apps;
use crate::cache::ArtifactCache;
use crate::server::Vitals;

/// Longest wait between two attempts to load what failed to load.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Heartbeat period while the balancers route this server.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Heartbeat periods once the balancers stop routing to it (lb `drain` or `maint`): an
/// operation waiting for "drained" learns it about this long after the last request ended.
/// Fastest while a drain usually completes, slower for a long drain, then back to normal.
const HEARTBEAT_DRAINING: [(Duration, Duration); 2] = [
    (Duration::from_secs(5), Duration::from_millis(25)),
    (Duration::from_secs(60), Duration::from_millis(100)),
];

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct ControllerLink {
    /// The controller, or the active one and its standbys.
    pub controller: Arc<Controllers>,
    pub join_token: String,
    pub zone: String,
    /// The address the balancer and smoke tests reach this server at (default: the address
    /// the server is bound to).
    pub advertise: Option<String>,
}

/// Sending a request to the controller: one that cannot connect to it (refused, or no answer
/// within the connect timeout) makes the next controller of the list current, so that a standby
/// that took over at an address of its own is found. A controller slow to answer is not left
/// for that.
pub(crate) trait SendToController {
    fn send_to(
        self,
        controllers: &Controllers,
    ) -> impl std::future::Future<Output = Result<reqwest::Response, reqwest::Error>> + Send;
}

impl SendToController for reqwest::RequestBuilder {
    async fn send_to(self, controllers: &Controllers) -> Result<reqwest::Response, reqwest::Error> {
        let at = controllers.current();
        let sent = self.send().await;
        if let Err(e) = &sent
            && e.is_connect()
            && let Some(next) = controllers.unreachable(at)
        {
            tracing::warn!("the controller cannot be reached ({e}); trying {next}");
        }
        sent
    }
}

pub struct Deployer {
    link: ControllerLink,
    name: String,
    apps: Arc<Apps>,
    vitals: Arc<Vitals>,
    cache: ArtifactCache,
    state_file: PathBuf,
    http: reqwest::Client,
    /// Wakes the heartbeat loop right after a change.
    pub changed: Arc<Notify>,
    /// Since when the balancers no longer send this server new requests, if they do not.
    draining_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The server's scheduler flag, as the desired state last said; the scheduler service
    /// claims ticks while it is on.
    pub scheduler_on: Arc<std::sync::atomic::AtomicBool>,
    /// Installs the platform build the desired state names.
    upgrader: Option<Arc<crate::upgrade::Upgrader>>,
}

impl Deployer {
    pub fn new(
        link: ControllerLink,
        name: String,
        apps: Arc<Apps>,
        vitals: Arc<Vitals>,
        cache: ArtifactCache,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Deployer> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("building the HTTP client")?;
        Ok(Deployer {
            link,
            name,
            apps,
            vitals,
            cache,
            state_file: data_dir.join("desired.json"),
            http,
            changed: Arc::new(Notify::new()),
            draining_since: std::sync::Mutex::new(None),
            scheduler_on: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            upgrader: None,
        })
    }

    pub fn with_upgrader(mut self, upgrader: Arc<crate::upgrade::Upgrader>) -> Deployer {
        self.upgrader = Some(upgrader);
        self
    }

    /// The client it reaches the controller with.
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    fn url(&self, path: &str) -> String {
        self.link.controller.url(path)
    }

    /// Serves what was last applied, from the local artifact cache, before the controller is
    /// reached. Returns the generation it was at.
    pub async fn restore(&self) -> i64 {
        let text = match tokio::fs::read_to_string(&self.state_file).await {
            Ok(text) => text,
            Err(_) => return 0,
        };
        match serde_json::from_str::<DesiredState>(&text) {
            Ok(state) => {
                let (loaded, failed) = self.apply(&state, true).await;
                tracing::info!(
                    generation = state.generation,
                    loaded,
                    failed,
                    "restored the last desired state from the local cache"
                );
                state.generation
            }
            Err(e) => {
                tracing::warn!(file = %self.state_file.display(), "ignoring the saved desired state: {e}");
                0
            }
        }
    }

    /// The deployment service's loop. `generation` is the one restored from the local state:
    /// the first fetch does not wait, later ones long-poll past what is applied. Returns only
    /// when the controller refuses this server's first registration (a wrong join token, a name
    /// or zone it does not take): retrying would not help, and the process stops saying why.
    pub async fn run(self: Arc<Self>, mut generation: i64) -> anyhow::Result<()> {
        self.register_until_done(true).await?;
        tokio::spawn(self.clone().heartbeats());
        let mut first = true;
        let mut failures = 0u32;
        let mut retry_delay = Duration::ZERO;
        loop {
            let after = if first { None } else { Some(generation) };
            match self.fetch_desired(after).await {
                Ok(state) => {
                    failures = 0;
                    let changed = first || state.generation != generation;
                    first = false;
                    self.note_lb(state.lb);
                    if let Some(upgrader) = &self.upgrader {
                        upgrader.check(state.platform.as_ref(), state.platform_generation);
                    }
                    self.scheduler_on
                        .store(state.scheduler, std::sync::atomic::Ordering::Release);
                    if state.deployment && changed {
                        let (_, failed) = self.apply(&state, false).await;
                        self.changed.notify_one();
                        // What is served now, failures and all: a restart without the
                        // controller never brings back versions older than those.
                        self.save(&self.served(&state)).await;
                        if failed > 0 {
                            // Try again, backing off, or at once when the desired state changes
                            // (an operation putting the old version back); the next fetch does
                            // not wait.
                            retry_delay =
                                (retry_delay * 2).clamp(Duration::from_secs(1), MAX_RETRY);
                            let _ = tokio::time::timeout(
                                retry_delay,
                                self.fetch_desired(Some(state.generation)),
                            )
                            .await;
                            first = true;
                            continue;
                        }
                        retry_delay = Duration::ZERO;
                    } else if !state.deployment && changed {
                        tracing::info!(
                            generation = state.generation,
                            "deployment service is off: keeping the apps loaded now"
                        );
                    }
                    generation = state.generation;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(
                            "cannot reach the controller, serving what is loaded: {e:#}"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // Removed from the farm while stopping: it stays out.
                    if e.downcast_ref::<Refusal>()
                        .is_some_and(|r| r.is("unknown_server"))
                        && self.vitals.state() != paddock_core::ServerState::Stopping
                    {
                        self.register_until_done(false).await?;
                    }
                }
            }
        }
    }

    /// Registers, retrying while the controller cannot be reached. A refusal ends the first
    /// registration (the process stops); a server already serving keeps serving and retries.
    async fn register_until_done(&self, first: bool) -> anyhow::Result<()> {
        let registration = Registration {
            name: self.name.clone(),
            zone: self.link.zone.clone(),
            address: self.link.advertise.clone().unwrap_or_default(),
            platform_version: env!("CARGO_PKG_VERSION").to_string(),
            engine: self.apps.runtime().engine_hash().to_string(),
            incarnation: Some(self.vitals.incarnation().to_string()),
        };
        let mut attempt = 0u32;
        loop {
            let result = async {
                let response = self
                    .http
                    .post(self.url("/control/v1/register"))
                    .bearer_auth(&self.link.join_token)
                    .json(&registration)
                    .send_to(&self.link.controller)
                    .await?;
                match check(response).await {
                    Err(r)
                        if first
                            && matches!(
                                r.status,
                                reqwest::StatusCode::BAD_REQUEST
                                    | reqwest::StatusCode::UNAUTHORIZED
                                    | reqwest::StatusCode::FORBIDDEN
                            ) =>
                    {
                        Ok(Err(anyhow::Error::from(r)))
                    }
                    other => other.map(Ok).map_err(anyhow::Error::from),
                }
            }
            .await;
            match result {
                Ok(Ok(_)) => {
                    tracing::info!(controller = %self.link.controller.base(), zone = %self.link.zone, "registered with the controller");
                    return Ok(());
                }
                Ok(Err(refusal)) => {
                    return Err(refusal.context(format!(
                        "the controller at {} refused to register this front-end",
                        self.link.controller.base()
                    )));
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(30) {
                        tracing::warn!(controller = %self.link.controller.base(), "cannot register, retrying: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn fetch_desired(&self, after: Option<i64>) -> anyhow::Result<DesiredState> {
        let mut request = self
            .http
            .get(self.url(&format!("/control/v1/desired/{}", self.name)));
        if let Some(after) = after {
            request = request.query(&[("after", after)]);
        }
        let response = request
            .bearer_auth(&self.link.join_token)
            .timeout(Duration::from_secs(60))
            .send_to(&self.link.controller)
            .await?;
        Ok(check(response).await?.json().await?)
    }

    async fn heartbeat(&self, timeout: Duration) -> anyhow::Result<()> {
        let report = self.vitals.report(&self.apps);
        let response = self
            .http
            .post(self.url(&format!("/control/v1/heartbeat/{}", self.name)))
            .bearer_auth(&self.link.join_token)
            .timeout(timeout)
            .json(&report)
            .send_to(&self.link.controller)
            .await?;
        check(response).await?;
        Ok(())
    }

    /// The last heartbeat of a stopping server, so that the controller knows at once (and
    /// `paddock server NAME remove` can follow) instead of after its silence.
    pub async fn farewell(&self) {
        if let Err(e) = self.heartbeat(Duration::from_secs(1)).await {
            tracing::debug!("last heartbeat not sent: {e:#}");
        }
    }

    async fn heartbeats(self: Arc<Self>) {
        loop {
            if let Err(e) = self.heartbeat(Duration::from_secs(5)).await {
                tracing::debug!("heartbeat not sent: {e:#}");
            }
            let draining_for = self
                .draining_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|since| since.elapsed());
            let period = HEARTBEAT_DRAINING
                .iter()
                .find(|(within, _)| draining_for.is_some_and(|d| d < *within))
                .map_or(HEARTBEAT, |(_, period)| *period);
            let _ = tokio::time::timeout(period, self.changed.notified()).await;
        }
    }

    /// Remembers whether the balancers route this server; heartbeats go faster while it drains.
    fn note_lb(&self, lb: paddock_api::LbState) {
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (lb, *since) {
            (paddock_api::LbState::Ready, _) => *since = None,
            (_, None) => {
                *since = Some(std::time::Instant::now());
                self.changed.notify_one();
            }
            (_, Some(_)) => {}
        }
    }

    /// Loads every desired app version that is not served as desired, then swaps them all in
    /// and undeploys the apps no longer desired in one step (so that apps can swap routes, or
    /// take over a removed app's route). Returns how many apps were loaded and how many failed.
    async fn apply(&self, state: &DesiredState, cache_only: bool) -> (usize, usize) {
        // Earlier failures are being retried now (or are no longer desired): not reported
        // meanwhile, so that nobody takes an old failure for the outcome of this attempt.
        self.vitals.set_failed(Vec::new());
        self.changed.notify_one();
        let mut failures = Vec::new();
        let mut failed = |name: &str, version: &str, error: String| {
            tracing::error!(app = %name, version = %version, "cannot deploy, keeping what is served: {error}");
            failures.push(paddock_api::LoadFailure {
                name: name.to_string(),
                version: version.to_string(),
                error,
            });
        };
        let mut prepared = Vec::new();
        for app in &state.apps {
            if let Some(current) = self.apps.current(&app.name) {
                let s = current.spec();
                if s.version == app.version
                    && s.component_sha256 == app.component_sha256
                    && s.route == app.route
                    && s.limits == app.limits
                    && s.config == app.config
                {
                    continue;
                }
                // Only the config changed (a run-time override): the code already loaded
                // serves it.
                if let Some(version) = current.with_config(spec_of(app)) {
                    prepared.push((version, Duration::ZERO));
                    continue;
                }
            }
            let started = std::time::Instant::now();
            match self.prepare(app, cache_only).await {
                Ok(version) => prepared.push((version, started.elapsed())),
                Err(e) => failed(&app.name, &app.version, format!("{e:#}")),
            }
        }
        let took: HashMap<String, Duration> = prepared
            .iter()
            .map(|(v, took)| (v.spec().name.clone(), *took))
            .collect();
        let done = self
            .apps
            .install(prepared.into_iter().map(|(v, _)| v).collect(), |name| {
                state.apps.iter().any(|a| a.name == name)
            });
        for (version, e) in &done.refused {
            let s = version.spec();
            failed(&s.name, &s.version, e.to_string());
        }
        for (version, previous) in &done.deployed {
            let s = version.spec();
            tracing::info!(
                app = %s.name,
                version = %s.version,
                route = %s.route,
                previous = previous.as_ref().map(|p| p.spec().version.as_str()).unwrap_or("none"),
                load_ms = took.get(&s.name).map_or(0, Duration::as_millis) as u64,
                "app deployed"
            );
        }
        for version in &done.undeployed {
            let s = version.spec();
            tracing::info!(app = %s.name, version = %s.version, "app undeployed: no longer desired");
        }
        let failed = failures.len();
        self.vitals.set_failed(failures);
        (done.deployed.len(), failed)
    }

    /// `state` as served now: each desired app at the version loaded here (which differs from
    /// the desired one when that failed to load), without the apps not loaded at all.
    fn served(&self, state: &DesiredState) -> DesiredState {
        let apps = state
            .apps
            .iter()
            .filter_map(|app| {
                let current = self.apps.current(&app.name)?;
                let s = current.spec();
                Some(DesiredApp {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    route: s.route.clone(),
                    component_sha256: s.component_sha256.clone(),
                    limits: s.limits,
                    config: s.config.clone(),
                })
            })
            .collect();
        DesiredState {
            apps,
            ..state.clone()
        }
    }

    /// `app` ready to serve: from the local artifact cache, else downloaded (and compiled here
    /// when the controller compiles for another engine).
    async fn prepare(
        &self,
        app: &DesiredApp,
        cache_only: bool,
    ) -> anyhow::Result<Arc<paddock_runtime::AppVersion>> {
        anyhow::ensure!(
            paddock_core::is_sha256(&app.component_sha256),
            "desired state names component {:?}, which is not a sha256",
            app.component_sha256
        );
        let spec = spec_of(app);
        let cached = {
            let cache = self.cache.clone();
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || cache.load_cached(spec)).await?
        };
        let version = match cached {
            Some(version) => version,
            None if cache_only => anyhow::bail!("not in the local artifact cache"),
            None => {
                let cache = self.cache.clone();
                match self.download(&app.component_sha256).await? {
                    Download::Artifact(bytes) => {
                        tokio::task::spawn_blocking(move || cache.load_artifact(spec, &bytes))
                            .await??
                    }
                    Download::Component(bytes) => {
                        tracing::info!(
                            app = %app.name,
                            version = %app.version,
                            "the controller compiles for another engine (another Paddock release or CPU): compiling the component here"
                        );
                        tokio::task::spawn_blocking(move || cache.load_component(spec, &bytes))
                            .await??
                    }
                }
            }
        };
        Ok(version)
    }

    /// The artifact for this server's engine, or the component itself when the controller
    /// compiles for another engine (a platform upgrade in progress, or another CPU).
    async fn download(&self, component_sha256: &str) -> anyhow::Result<Download> {
        let engine = self.apps.runtime().engine_hash().to_string();
        let response = self
            .http
            .get(self.url(&format!("/control/v1/artifacts/{component_sha256}")))
            .query(&[("engine", engine)])
            .bearer_auth(&self.link.join_token)
            .timeout(Duration::from_secs(120))
            .send_to(&self.link.controller)
            .await?;
        let response = match check(response).await {
            Ok(response) => response,
            Err(r) if r.is("engine_mismatch") => {
                return self
                    .download_component(component_sha256)
                    .await
                    .map(Download::Component);
            }
            Err(r) => return Err(r.into()),
        };
        let expected = response
            .headers()
            .get("x-paddock-artifact-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .context("the controller sent an artifact without its sha256")?;
        let bytes = response.bytes().await?.to_vec();
        let actual = sha256_hex(&bytes);
        anyhow::ensure!(
            actual == expected,
            "artifact download damaged: sha256 {actual}, expected {expected}"
        );
        Ok(Download::Artifact(bytes))
    }

    async fn download_component(&self, component_sha256: &str) -> anyhow::Result<Vec<u8>> {
        let response = self
            .http
            .get(self.url(&format!("/control/v1/components/{component_sha256}")))
            .bearer_auth(&self.link.join_token)
            .timeout(Duration::from_secs(120))
            .send_to(&self.link.controller)
            .await?;
        let bytes = check(response).await?.bytes().await?.to_vec();
        let actual = sha256_hex(&bytes);
        anyhow::ensure!(
            actual == component_sha256,
            "component download damaged: sha256 {actual}, expected {component_sha256}"
        );
        Ok(bytes)
    }

    async fn save(&self, state: &DesiredState) {
        let result = async {
            let json = serde_json::to_vec_pretty(state)?;
            let path = self.state_file.clone();
            tokio::task::spawn_blocking(move || crate::cache::write_atomically(&path, &json))
                .await?
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(file = %self.state_file.display(), "cannot save the desired state: {e:#}");
        }
    }
}

fn spec_of(app: &DesiredApp) -> AppSpec {
    AppSpec {
        name: app.name.clone(),
        version: app.version.clone(),
        route: app.route.clone(),
        component_sha256: app.component_sha256.clone(),
        limits: app.limits,
        config: app.config.clone(),
    }
}

/// What the controller sent for a component: ready to load, or to compile here.
enum Download {
    Artifact(Vec<u8>),
    Component(Vec<u8>),
}

/// An error answer of the controller: its status, and its API error code and message when the
/// body is one (callers branch on the code).
#[derive(Debug)]
struct Refusal {
    status: reqwest::StatusCode,
    code: Option<String>,
    message: String,
}

impl Refusal {
    fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({}, {code})", self.message, self.status),
            None => write!(f, "controller answered {}: {}", self.status, self.message),
        }
    }
}

impl std::error::Error for Refusal {}

/// The response if it is a success, else the controller's refusal.
async fn check(response: reqwest::Response) -> Result<reqwest::Response, Refusal> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(match serde_json::from_str::<paddock_api::ApiError>(&body) {
        Ok(e) => Refusal {
            status,
            code: Some(e.error),
            message: e.message,
        },
        Err(_) => Refusal {
            status,
            code: None,
            message: body,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_runtime::RuntimeConfig;

    const HELLO: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/apps/packages/hello-v1/hello.wasm"
    );

    /// A controller that compiles for another engine: every artifact request is answered
    /// `engine_mismatch`, and the component is served as `component`.
    async fn controller_of_another_engine(component: Vec<u8>) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let component = component.clone();
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let path = request.uri().path().to_string();
                    let component = component.clone();
                    async move {
                        let (status, body) = if path.starts_with("/control/v1/artifacts/") {
                            (
                                409,
                                br#"{"error":"engine_mismatch","message":"no artifact for engine x"}"#
                                    .to_vec(),
                            )
                        } else if path.starts_with("/control/v1/components/") {
                            (200, component)
                        } else {
                            (404, b"{}".to_vec())
                        };
                        http::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        format!("http://{addr}")
    }

    fn deployer(url: String, data: &std::path::Path) -> Deployer {
        let runtime = Arc::new(
            paddock_runtime::Runtime::new(&RuntimeConfig {
                max_instances: 4,
                ..RuntimeConfig::default()
            })
            .unwrap(),
        );
        let cache = ArtifactCache::open(&data.join("artifacts"), runtime.clone()).unwrap();
        let link = ControllerLink {
            controller: Arc::new(Controllers::parse(&url).unwrap()),
            join_token: "t".into(),
            zone: "default".into(),
            advertise: None,
        };
        Deployer::new(
            link,
            "fe1".into(),
            Arc::new(Apps::new(runtime)),
            Arc::new(Vitals::new("fe1")),
            cache,
            data,
        )
        .unwrap()
    }

    fn hello(sha256: &str) -> DesiredApp {
        DesiredApp {
            name: "hello".into(),
            version: "v1".into(),
            route: "/hello".into(),
            component_sha256: sha256.into(),
            limits: paddock_core::Limits::default(),
            config: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_server_the_controller_cannot_compile_for_compiles_the_component_itself() {
        let component = std::fs::read(HELLO).unwrap();
        let sha = sha256_hex(&component);
        let data = tempfile::tempdir().unwrap();
        let deployer = deployer(controller_of_another_engine(component).await, data.path());
        let state = DesiredState {
            generation: 1,
            deployment: true,
            apps: vec![hello(&sha)],
            lb: paddock_api::LbState::Ready,
            scheduler: true,
            platform: None,
            platform_generation: 0,
        };
        assert_eq!(deployer.apply(&state, false).await, (1, 0));
        let loaded = deployer.apps.loaded();
        assert_eq!(
            loaded
                .iter()
                .map(|a| a.version.as_str())
                .collect::<Vec<_>>(),
            ["v1"]
        );
        // Compiled once: a restart finds it in the cache.
        assert!(deployer.cache.load_cached(spec_of(&hello(&sha))).is_some());
    }

    #[tokio::test]
    async fn what_is_saved_for_a_restart_is_what_is_served() {
        let component = std::fs::read(HELLO).unwrap();
        let v1 = hello(&sha256_hex(&component));
        let data = tempfile::tempdir().unwrap();
        let deployer = deployer(controller_of_another_engine(component).await, data.path());
        let mut state = DesiredState {
            generation: 7,
            deployment: true,
            apps: vec![v1.clone()],
            lb: paddock_api::LbState::Ready,
            scheduler: true,
            platform: None,
            platform_generation: 0,
        };
        assert_eq!(deployer.apply(&state, false).await, (1, 0));
        assert_eq!(deployer.served(&state), state);
        // v2 cannot be had (its component is not the one served) and `other` not at all.
        let mut v2 = v1.clone();
        v2.version = "v2".into();
        v2.component_sha256 = "1".repeat(64);
        let mut other = v1.clone();
        other.name = "other".into();
        other.route = "/other".into();
        other.component_sha256 = "2".repeat(64);
        state.apps = vec![v2, other];
        assert_eq!(deployer.apply(&state, false).await, (0, 2));
        let served = deployer.served(&state);
        assert_eq!(served.apps, [v1]);
        assert_eq!(served.generation, 7);
    }

    #[tokio::test]
    async fn apps_swap_routes_and_take_over_a_removed_apps_route_in_one_apply() {
        let component = std::fs::read(HELLO).unwrap();
        let sha = sha256_hex(&component);
        let data = tempfile::tempdir().unwrap();
        let deployer = deployer(controller_of_another_engine(component).await, data.path());
        let app = |name: &str, version: &str, route: &str| DesiredApp {
            name: name.into(),
            version: version.into(),
            route: route.into(),
            ..hello(&sha)
        };
        let mut state = DesiredState {
            generation: 1,
            deployment: true,
            apps: vec![
                app("a", "v1", "/x"),
                app("b", "v1", "/y"),
                app("c", "v1", "/z"),
            ],
            lb: paddock_api::LbState::Ready,
            scheduler: true,
            platform: None,
            platform_generation: 0,
        };
        assert_eq!(deployer.apply(&state, false).await, (3, 0));
        // a and b swap routes; c is removed and d takes its route.
        state.generation = 2;
        state.apps = vec![
            app("a", "v2", "/y"),
            app("b", "v2", "/x"),
            app("d", "v1", "/z"),
        ];
        assert_eq!(deployer.apply(&state, false).await, (3, 0));
        assert_eq!(deployer.served(&state), state);
        assert!(deployer.vitals.report(&deployer.apps).failed.is_empty());
    }

    #[tokio::test]
    async fn a_component_that_does_not_match_its_sha256_is_not_compiled() {
        let component = std::fs::read(HELLO).unwrap();
        let sha = sha256_hex(&component);
        let data = tempfile::tempdir().unwrap();
        let mut other = component.clone();
        other.push(0);
        let deployer = deployer(controller_of_another_engine(other).await, data.path());
        let err = deployer.prepare(&hello(&sha), false).await.unwrap_err();
        assert!(
            err.to_string().contains("component download damaged"),
            "{err:#}"
        );
        assert!(deployer.apps.loaded().is_empty());
    }
}
