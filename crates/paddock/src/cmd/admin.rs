//! The admin commands: a client of the controller's admin API (`/v1/...`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use paddock_api::{ApiError, AppSummary, ServerFlag, ServerInfo, VersionInfo};
use paddock_api::{LbState, Policy, Role};
use paddock_controller::api::{
    Deployed, FlagRequest, LbRequest, PolicyRequest, PolicySet, RoleRequest, RollbackRequest,
    Status, Uploaded,
};
use paddock_controller::routing::RoutingStatus;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where the controller is and how to prove we are its admin.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The controller's URL; several, separated by commas (the active controller and its
    /// standbys): the first that answers.
    #[arg(
        long,
        global = true,
        env = "PADDOCK_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub controller: String,
    /// The admin token (default: read from <data>/controller/admin.token).
    #[arg(long, global = true, env = "PADDOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The data folder of `paddock up` or the controller, to read the admin token from.
    #[arg(long, global = true, env = "PADDOCK_DATA", default_value = ".paddock")]
    pub data: PathBuf,
    /// Print the controller's answer as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    pub json: bool,
}

impl Client {
    /// A client of the controller that answers: with several URLs, the first one that does
    /// (only the controller holding the role listens).
    pub async fn connect(target: &Target) -> anyhow::Result<Client> {
        let controllers = paddock_api::Controllers::parse(&target.controller)
            .map_err(|e| anyhow::anyhow!("--controller: {e}"))?;
        let token = match &target.token {
            Some(token) => token.clone(),
            None => read_token(&target.data)?,
        };
        let mut client = Client {
            base: controllers.base().to_string(),
            token,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()?,
            json: target.json,
        };
        if let [_, _, ..] = controllers.all() {
            let mut tried = Vec::new();
            for url in controllers.all() {
                let probe = client
                    .http
                    .get(format!("{url}/v1/status"))
                    .bearer_auth(&client.token)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match probe {
                    // A 5xx may come from a proxy in front of a controller that is not there.
                    Ok(answer) if !answer.status().is_server_error() => {
                        client.base = url.clone();
                        return Ok(client);
                    }
                    Ok(answer) => tried.push(format!("{url}: answered {}", answer.status())),
                    Err(e) => tried.push(format!("{url}: {e}")),
                }
            }
            anyhow::bail!(
                "no controller answers at {}; is `paddock controller` (or `paddock up`) running? ({})",
                controllers.all().join(", "),
                tried.join("; ")
            );
        }
        Ok(client)
    }

    /// Sends the request with the admin token; a failure answer becomes the API's message.
    async fn send_raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            // reqwest's own message names the URL only; the causes say what happened.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                why.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            anyhow::anyhow!(
                "cannot reach the controller at {}: {why}; is `paddock controller` (or `paddock up`) running? Set --controller or PADDOCK_CONTROLLER",
                self.base
            )
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&body) {
            Ok(e) => anyhow::bail!("{}", e.message),
            Err(_) => anyhow::bail!("the controller answered {status}: {body}"),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = self.send_raw(request).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return serde_json::from_str("null").context("empty answer");
        }
        response
            .json()
            .await
            .context("reading the controller's answer")
    }

    /// The URL of `path` with `query` encoded (keys and bucket names may hold any character).
    fn url(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<reqwest::Url> {
        reqwest::Url::parse_with_params(&format!("{}{path}", self.base), query)
            .with_context(|| format!("{}{path} is not a URL", self.base))
    }

    pub async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path, query)?)).await
    }

    /// A GET whose answer is bytes, not JSON.
    pub async fn get_bytes(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
        let response = self.send_raw(self.http.get(self.url(path, query)?)).await?;
        Ok(response
            .bytes()
            .await
            .context("reading the controller's answer")?
            .to_vec())
    }

    /// A POST of a file, streamed.
    pub async fn post_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &Path,
    ) -> anyhow::Result<T> {
        let opened = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        let size = opened
            .metadata()
            .await
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            opened,
            1 << 20,
        ));
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_LENGTH, size)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        )
        .await
    }

    /// A PUT of bytes.
    pub async fn put_bytes(
        &self,
        path: &str,
        query: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.send::<()>(self.http.put(self.url(path, query)?).body(body))
            .await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// A DELETE whose answer is JSON.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    pub async fn delete_query(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<()> {
        self.send::<()>(self.http.delete(self.url(path, query)?))
            .await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send::<()>(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// Uploads a package folder; with `deploy`, also makes it the desired version.
    pub async fn upload(&self, package: &Path, deploy: bool) -> anyhow::Result<Uploaded> {
        let manifest_path = package.join("paddock.toml");
        let manifest_text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest = paddock_core::Manifest::from_toml(&manifest_text)
            .with_context(|| format!("{}", manifest_path.display()))?;
        let component_path = package.join(&manifest.component);
        let component = std::fs::read(&component_path)
            .with_context(|| format!("reading the component {}", component_path.display()))?;
        // Refuse here what the controller would refuse: a large body cut off mid-upload would
        // only show as a broken connection.
        let status: Status = self.get("/v1/status").await?;
        let size = component.len() + manifest_text.len();
        if size > status.max_upload_bytes {
            anyhow::bail!(
                "the package is {size} bytes, larger than the {} bytes the controller accepts; make the component smaller or start the controller with a larger --max-upload-mib",
                status.max_upload_bytes
            );
        }
        let form = reqwest::multipart::Form::new()
            .text("manifest", manifest_text)
            .part(
                "component",
                reqwest::multipart::Part::bytes(component).file_name(manifest.component.clone()),
            );
        let url = format!("{}/v1/apps?deploy={deploy}", self.base);
        self.send(self.http.post(url).multipart(form)).await
    }

    pub fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human(value);
        }
        Ok(())
    }
}

fn read_token(data: &Path) -> anyhow::Result<String> {
    let candidates = [
        data.join("controller/admin.token"),
        data.join("admin.token"),
    ];
    for path in &candidates {
        if let Ok(token) = std::fs::read_to_string(path) {
            return Ok(token.trim().to_string());
        }
    }
    anyhow::bail!(
        "no admin token: set PADDOCK_TOKEN or --token, or run where `paddock up` keeps {} ",
        candidates[0].display()
    )
}

#[derive(clap::Subcommand)]
pub enum AppCommand {
    /// Store and compile a package's version; deploys nothing.
    Upload { path: PathBuf },
    /// Upload, then deploy to every front-end of the app's zone and wait until they serve it.
    Publish {
        path: PathBuf,
        /// How long to wait for every front-end to report the version.
        #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
        timeout: Duration,
    },
    /// The apps of the farm.
    List,
    /// Every version of an app.
    Versions { name: String },
    /// Deploy the previous version of an app (or the one named), and wait like publish.
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
        timeout: Duration,
    },
}

pub async fn app(client: &Client, command: AppCommand) -> anyhow::Result<()> {
    match command {
        AppCommand::Upload { path } => {
            let uploaded = client.upload(&path, false).await?;
            client.print(&uploaded, |u| {
                let v = &u.version;
                let what = if u.created {
                    "uploaded and compiled"
                } else {
                    "already stored, unchanged"
                };
                println!(
                    "{}@{} {what} (zone {}, sha256 {}); not deployed",
                    v.app, v.version, v.zone, v.component_sha256
                );
            })
        }
        AppCommand::Publish { path, timeout } => {
            let uploaded = client.upload(&path, true).await?;
            let v = &uploaded.version;
            if !client.json {
                println!(
                    "{}@{} stored; deploying to zone {}",
                    v.app, v.version, v.zone
                );
            }
            wait_rollout(client, v, timeout).await?;
            client.print(&uploaded, |_| {})
        }
        AppCommand::List => {
            let apps: Vec<AppSummary> = client.get("/v1/apps").await?;
            client.print(&apps, |apps| {
                println!(
                    "{:<20} {:<12} {:>8} {:<16} {:<16}",
                    "APP", "ZONE", "VERSIONS", "LATEST", "DEPLOYED"
                );
                for a in apps {
                    println!(
                        "{:<20} {:<12} {:>8} {:<16} {:<16}",
                        a.name,
                        a.zone,
                        a.versions,
                        a.latest,
                        a.desired.as_deref().unwrap_or("-")
                    );
                }
            })
        }
        AppCommand::Versions { name } => {
            let versions: Vec<VersionInfo> =
                client.get(&format!("/v1/apps/{name}/versions")).await?;
            client.print(&versions, |versions| {
                println!(
                    "{:<16} {:<12} {:<16} COMPONENT SHA256",
                    "VERSION", "ZONE", "ROUTE"
                );
                for v in versions {
                    println!(
                        "{:<16} {:<12} {:<16} {}",
                        v.version, v.zone, v.manifest.route, v.component_sha256
                    );
                }
            })
        }
        AppCommand::Rollback { name, to, timeout } => {
            let deployed: Deployed = client
                .post(
                    &format!("/v1/apps/{name}/rollback"),
                    &RollbackRequest { to },
                )
                .await?;
            if !client.json {
                println!("rolling {} back to {}", name, deployed.version.version);
            }
            wait_rollout(client, &deployed.version, timeout).await?;
            client.print(&deployed, |_| {})
        }
    }
}

/// Waits until every live balancer routes by the current routing table (which has the app's
/// route), so that the app answers through them when a publish returns.
async fn wait_routed(client: &Client, started: Instant, timeout: Duration) -> anyhow::Result<()> {
    loop {
        let routing: RoutingStatus = client.get("/v1/routing").await?;
        if routing.applied {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "balancer(s) {} did not apply routing generation {} within {timeout:?}; `paddock routing` shows what each routes by",
                routing.pending.join(", "),
                routing.table.generation
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a front-end must report a version failed before a rollout wait gives up on it.
const FAILURE_IS_FINAL: Duration = Duration::from_secs(2);

/// Waits until every live front-end of the version's zone whose deployment service is on reports
/// the version loaded; prints each as it does. Fails naming the servers that did not.
pub async fn wait_rollout(
    client: &Client,
    v: &VersionInfo,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut reported = std::collections::BTreeSet::new();
    // Since when each server has reported the version failed: a report from before this deploy
    // reached it (a retry of an earlier failure) is not final, one that lasts is.
    let mut failing_since = std::collections::HashMap::new();
    loop {
        let status: Status = client.get("/v1/status").await?;
        let targets: Vec<_> = status
            .servers
            .iter()
            .filter(|s| s.server.zone == v.zone && s.server.deployment && s.alive)
            .collect();
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for s in &targets {
            let serving = s.server.observed.as_ref().is_some_and(|o| {
                o.apps
                    .iter()
                    .any(|a| a.name == v.app && a.version == v.version)
            });
            if serving {
                if reported.insert(s.server.name.clone()) && !client.json {
                    println!(
                        "  {:<16} serves {}@{} ({:.1}s)",
                        s.server.name,
                        v.app,
                        v.version,
                        started.elapsed().as_secs_f64()
                    );
                }
            } else {
                waiting.push(s.server.name.clone());
                let failure = s.server.observed.as_ref().and_then(|o| {
                    o.failed
                        .iter()
                        .find(|f| f.name == v.app && f.version == v.version)
                });
                match failure {
                    Some(f) => {
                        let since = *failing_since
                            .entry(s.server.name.clone())
                            .or_insert_with(Instant::now);
                        if since.elapsed() >= FAILURE_IS_FINAL {
                            failed.push(format!("{}: {}", s.server.name, f.error));
                        }
                    }
                    None => {
                        failing_since.remove(&s.server.name);
                    }
                }
            }
        }
        if !failed.is_empty() {
            anyhow::bail!(
                "{}@{} did not load on {}; those servers keep serving what they had and retry \
                 (`paddock status` shows them, `paddock app rollback {}` puts the previous version back)",
                v.app,
                v.version,
                failed.join("; "),
                v.app
            );
        }
        if waiting.is_empty() {
            wait_routed(client, started, timeout).await?;
            if !client.json {
                if targets.is_empty() {
                    println!(
                        "no live front-end of zone {} takes deployments now; they get it when they do",
                        v.zone
                    );
                } else {
                    println!(
                        "{}@{} is served by all {} front-end(s) of zone {}",
                        v.app,
                        v.version,
                        targets.len(),
                        v.zone
                    );
                }
            }
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{}@{} not reported by {} within {timeout:?}; `paddock status` shows what they serve",
                v.app,
                v.version,
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn servers(client: &Client) -> anyhow::Result<()> {
    let status: Status = client.get("/v1/status").await?;
    client.print(
        &status.servers.iter().map(|s| &s.server).collect::<Vec<_>>(),
        |_| {
            println!(
                "{:<12} {:<10} {:<8} {:<22} {:<7} {:<6} {:<10} {:<9} {:<10} {:<22} LOADED",
                "SERVER",
                "ZONE",
                "ROLE",
                "ADDRESS",
                "HEALTH",
                "LB",
                "DEPLOYMENT",
                "SCHEDULER",
                "HEARTBEAT",
                "PLATFORM"
            );
            let now = paddock_controller::now_ms();
            for s in &status.servers {
                let i: &ServerInfo = &s.server;
                let health = match (&i.observed, s.alive) {
                    (_, false) => "down".to_string(),
                    (Some(o), true) => format!("{:?}", o.state).to_lowercase(),
                    (None, true) => "?".into(),
                };
                let loaded = i
                    .observed
                    .as_ref()
                    .map(|o| {
                        o.apps
                            .iter()
                            .map(|a| format!("{}@{}", a.name, a.version))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let heartbeat = i
                    .heartbeat_ms
                    .map(|t| format!("{:.1}s ago", (now - t) as f64 / 1000.0))
                    .unwrap_or("never".into());
                let short = |sha: &str| sha.get(..12).unwrap_or(sha).to_string();
                let build = i.observed.as_ref().and_then(|o| o.build.as_deref());
                // The version it registered with, its build when known, and the build it is
                // told to run when that is another one.
                let mut platform = match build {
                    Some(build) => format!("{} {}", i.platform_version, short(build)),
                    None => i.platform_version.clone(),
                };
                if let Some(target) = i.platform_target.as_deref()
                    && build != Some(target)
                {
                    platform.push_str(&format!(" → {}", short(target)));
                }
                println!(
                    "{:<12} {:<10} {:<8} {:<22} {:<7} {:<6} {:<10} {:<9} {:<10} {:<22} {loaded}",
                    i.name,
                    i.zone,
                    i.role.as_str(),
                    i.address,
                    health,
                    i.lb.as_str(),
                    on_off(i.deployment),
                    on_off(i.scheduler),
                    heartbeat,
                    platform
                );
            }
        },
    )
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

#[derive(clap::Subcommand)]
pub enum ServerCommand {
    /// Switch the server's deployment service.
    Deployment { state: OnOff },
    /// Switch the server's scheduler service. Off, it claims no new timer tick at once.
    Scheduler {
        state: OnOff,
        /// After `off`: wait until the timer runs it started have ended.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
        timeout: Duration,
    },
    /// How the balancers treat the server: `ready` takes requests, `drain` takes no new ones
    /// (those in flight finish), `maint` takes no traffic and no health checks.
    Lb {
        state: LbArg,
        /// Its share of the zone's traffic under the `ratio` policy (1 to 100).
        #[arg(long)]
        weight: Option<u32>,
        /// Wait until every live balancer routes by the change (and, for drain and maint, until
        /// the server has no request in flight).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
        timeout: Duration,
    },
    /// Make the server `active` (in rotation, with its scheduler) or `passive` (standing by:
    /// it keeps taking the desired versions, but gets no traffic and no timers). Activation is
    /// refused unless it serves the versions desired in its zone.
    Role {
        role: RoleArg,
        /// Wait until every live balancer routes by the change (and, for passive, until the
        /// server has no request in flight).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "60s", value_parser = crate::positive_duration)]
        timeout: Duration,
    },
    /// Forget the server (it registers again if it is still running).
    Remove,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum RoleArg {
    Active,
    Passive,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum LbArg {
    Ready,
    Drain,
    Maint,
}

impl From<LbArg> for LbState {
    fn from(arg: LbArg) -> LbState {
        match arg {
            LbArg::Ready => LbState::Ready,
            LbArg::Drain => LbState::Drain,
            LbArg::Maint => LbState::Maint,
        }
    }
}

#[derive(clap::Subcommand)]
pub enum ZoneCommand {
    /// How balancers pick a front-end of the zone.
    Policy { policy: PolicyArg },
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum PolicyArg {
    RoundRobin,
    LeastConnections,
    Ratio,
}

pub async fn zone(client: &Client, name: &str, command: ZoneCommand) -> anyhow::Result<()> {
    let ZoneCommand::Policy { policy } = command;
    let policy = match policy {
        PolicyArg::RoundRobin => Policy::RoundRobin,
        PolicyArg::LeastConnections => Policy::LeastConnections,
        PolicyArg::Ratio => Policy::Ratio,
    };
    let set: PolicySet = client
        .post(
            &format!("/v1/zones/{name}/policy"),
            &PolicyRequest { policy },
        )
        .await?;
    client.print(&set, |s| {
        println!(
            "zone {}: policy {} (generation {})",
            s.zone,
            s.policy.as_str(),
            s.generation
        );
        if s.servers == Some(0) {
            println!(
                "note: no front-end is in zone {} yet; the policy applies to those that register there (`paddock servers` lists the zones in use)",
                s.zone
            );
        }
    })
}

/// Sets a server's routing state; with `wait`, returns once it is a fact.
async fn set_lb(
    client: &Client,
    name: &str,
    state: LbState,
    weight: Option<u32>,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let info: ServerInfo = client
        .post(
            &format!("/v1/servers/{name}/lb"),
            &LbRequest { state, weight },
        )
        .await?;
    if !wait {
        return client.print(&info, |i| {
            println!("{}: lb {}, weight {}", i.name, i.lb.as_str(), i.weight)
        });
    }
    let until = if state == LbState::Ready {
        Until::Applied
    } else {
        Until::Drained
    };
    wait_routed_state(
        client,
        name,
        &format!("lb {}", state.as_str()),
        until,
        timeout,
    )
    .await
}

/// What a routing wait waits for, beyond every live balancer routing by the current table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    Applied,
    /// The server has nothing in flight.
    Drained,
    /// Every live balancer's health checks pass for the server (a server new to the table
    /// starts down).
    Up,
}

/// Waits until every live balancer routes by the current table and, as `until` says, until
/// `name` is drained or up on all of them; prints what it waited for, as `what` (`lb drain`,
/// `passive`).
async fn wait_routed_state(
    client: &Client,
    name: &str,
    what: &str,
    until: Until,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut acknowledged = None;
    loop {
        let routing: RoutingStatus = client.get("/v1/routing").await?;
        let server = routing
            .servers
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("server {name} disappeared from the farm"))?;
        if routing.applied && acknowledged.is_none() {
            acknowledged = Some(started.elapsed());
        }
        let live_names: Vec<&str> = routing
            .balancers
            .iter()
            .filter(|b| b.alive)
            .map(|b| b.report.name.as_str())
            .collect();
        let down_on: Vec<&str> = live_names
            .iter()
            .copied()
            .filter(|b| !server.up_on.iter().any(|u| u == b))
            .collect();
        let done = routing.applied
            && match until {
                Until::Applied => true,
                Until::Drained => server.drained,
                Until::Up => down_on.is_empty(),
            };
        if done {
            let live = live_names.len();
            return client.print(&routing, |_| {
                let mut line = format!(
                    "{name}: {what}, acknowledged by {live} live balancer(s) in {:.2} s",
                    acknowledged.unwrap_or_default().as_secs_f64()
                );
                match until {
                    Until::Drained => {
                        line += &format!(
                            "; drained (nothing in flight) after {:.2} s",
                            started.elapsed().as_secs_f64()
                        )
                    }
                    Until::Up => {
                        line += &format!(
                            "; health checks pass on all of them after {:.2} s",
                            started.elapsed().as_secs_f64()
                        )
                    }
                    Until::Applied => {}
                }
                println!("{line}");
            });
        }
        if started.elapsed() > timeout {
            if !routing.applied {
                anyhow::bail!(
                    "{name}: {what} not acknowledged within {timeout:?} by balancer(s) {}; `paddock routing` shows what each routes by",
                    routing.pending.join(", ")
                );
            }
            if until == Until::Up {
                anyhow::bail!(
                    "{name}: {what}, but the health checks of balancer(s) {} do not pass for it after {timeout:?}; `paddock routing` shows it",
                    down_on.join(", ")
                );
            }
            anyhow::bail!(
                "{name}: not drained within {timeout:?}: {} request(s) in flight from balancers, {} on the server",
                server.balancer_in_flight,
                server
                    .in_flight
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process's build for a table: the build when known, the build it is told to run after `→`
/// when that is another one, and what it is installing or why it cannot.
fn build_column(state: &paddock_api::BuildState, target: Option<&str>) -> String {
    let short = |sha: &str| sha.get(..12).unwrap_or(sha).to_string();
    let mut build = state.build.as_deref().map(short).unwrap_or("-".into());
    if let Some(target) = target
        && state.build.as_deref() != Some(target)
    {
        build.push_str(&format!(" → {}", short(target)));
    }
    if let Some(installing) = &state.installing {
        build.push_str(&format!(" (installing {})", short(installing)));
    }
    if let Some(failure) = &state.upgrade_error {
        build.push_str(&format!(
            " (cannot install {}: {})",
            short(&failure.build),
            failure.error
        ));
    }
    build
}

/// `paddock standbys`.
pub async fn standbys(client: &Client) -> anyhow::Result<()> {
    let standbys: Vec<paddock_api::StandbyInfo> = client.get("/v1/standbys").await?;
    client.print(&standbys, |standbys| {
        if standbys.is_empty() {
            println!(
                "no standby controller reports to this one (start one with `paddock controller --standby --follow URL`)"
            );
            return;
        }
        println!(
            "{:<16} {:<20} {:<8} {:<8} {:<6} BUILD",
            "STANDBY", "HOST", "PID", "VERSION", "ALIVE"
        );
        for s in standbys {
            let r = &s.report;
            let build = build_column(&r.platform, None);
            println!(
                "{:<16} {:<20} {:<8} {:<8} {:<6} {build}",
                r.name,
                r.host,
                r.pid,
                r.version,
                if s.alive { "yes" } else { "no" }
            );
        }
    })
}

pub async fn routing(client: &Client) -> anyhow::Result<()> {
    let routing: RoutingStatus = client.get("/v1/routing").await?;
    client.print(&routing, |r| {
        println!(
            "routing generation {}: {}",
            r.table.generation,
            if r.applied {
                "applied by every live balancer".to_string()
            } else {
                format!("not yet applied by {}", r.pending.join(", "))
            }
        );
        println!(
            "{:<16} {:<22} {:<6} {:<10} {:<12} BUILD",
            "BALANCER", "LISTEN", "ALIVE", "GENERATION", "UPSTREAMS UP"
        );
        for b in &r.balancers {
            let up = b.report.upstreams.iter().filter(|u| u.up).count();
            let build = build_column(&b.report.platform, b.platform_target.as_deref());
            println!(
                "{:<16} {:<22} {:<6} {:<10} {:<12} {build}",
                b.report.name,
                b.report.listen,
                if b.alive { "yes" } else { "no" },
                b.report.generation,
                format!("{up}/{}", b.report.upstreams.len())
            );
        }
        let policies: std::collections::BTreeMap<&str, &str> = r
            .table
            .zones
            .iter()
            .map(|z| (z.zone.as_str(), z.policy.as_str()))
            .collect();
        println!(
            "{:<12} {:<10} {:<18} {:<6} {:<6} {:<10} {:<12} {:<8} UP ON",
            "SERVER", "ZONE", "POLICY", "LB", "WEIGHT", "IN FLIGHT", "VIA BALANCER", "DRAINED"
        );
        for s in &r.servers {
            println!(
                "{:<12} {:<10} {:<18} {:<6} {:<6} {:<10} {:<12} {:<8} {}",
                s.name,
                s.zone,
                policies
                    .get(s.zone.as_str())
                    .copied()
                    .unwrap_or("round-robin"),
                s.state.as_str(),
                s.weight,
                s.in_flight
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into()),
                s.balancer_in_flight,
                if s.state == LbState::Ready {
                    "-"
                } else if s.drained {
                    "yes"
                } else {
                    "no"
                },
                s.up_on.join(",")
            );
        }
        for route in &r.table.routes {
            // What the live balancers answered for the app since each started.
            let (answered, failed) = r
                .balancers
                .iter()
                .filter(|b| b.alive)
                .flat_map(|b| b.report.apps.iter().flatten().filter(|a| a.app == route.app))
                .fold((0, 0), |(n, f), a| (n + a.counts.answered, f + a.counts.failed));
            println!(
                "route {:<20} → {} (zone {}): {answered} answered by the live balancers, {failed} failed (5xx)",
                route.prefix, route.app, route.zone
            );
        }
    })
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum OnOff {
    On,
    Off,
}

pub async fn server(client: &Client, name: &str, command: ServerCommand) -> anyhow::Result<()> {
    let (flag, state, wait) = match command {
        ServerCommand::Lb {
            state,
            weight,
            wait,
            timeout,
        } => return set_lb(client, name, state.into(), weight, wait, timeout).await,
        ServerCommand::Deployment { state } => (ServerFlag::Deployment, state, None),
        ServerCommand::Scheduler {
            state,
            wait,
            timeout,
        } => (
            ServerFlag::Scheduler,
            state,
            (wait && matches!(state, OnOff::Off)).then_some(timeout),
        ),
        ServerCommand::Role {
            role,
            wait,
            timeout,
        } => {
            let role = match role {
                RoleArg::Active => Role::Active,
                RoleArg::Passive => Role::Passive,
            };
            let info: ServerInfo = client
                .post(&format!("/v1/servers/{name}/role"), &RoleRequest { role })
                .await?;
            if !wait {
                return client.print(&info, |i| println!("{}: {}", i.name, i.role.as_str()));
            }
            let until = match role {
                Role::Active => Until::Up,
                Role::Passive => Until::Drained,
            };
            return wait_routed_state(client, name, role.as_str(), until, timeout).await;
        }
        ServerCommand::Remove => {
            client.delete(&format!("/v1/servers/{name}")).await?;
            return client.print(&serde_json::json!({"removed": name}), |_| {
                println!("{name} removed")
            });
        }
    };
    let on = matches!(state, OnOff::On);
    let info: ServerInfo = client
        .post(
            &format!("/v1/servers/{name}/flags"),
            &FlagRequest { flag, on },
        )
        .await?;
    client.print(&info, |i| {
        println!(
            "{}: deployment {}, scheduler {}",
            i.name,
            on_off(i.deployment),
            on_off(i.scheduler)
        )
    })?;
    match wait {
        Some(timeout) => wait_timers_ended(client, name, timeout).await,
        None => Ok(()),
    }
}

/// Waits until no timer run holds a lease on `server`; names the runs it waited for.
async fn wait_timers_ended(client: &Client, server: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        let timers: Vec<paddock_api::TimerInfo> = client.get("/v1/timers").await?;
        let now = paddock_controller::now_ms();
        let running: Vec<String> = timers
            .iter()
            .filter(|t| {
                t.running_on.as_deref() == Some(server)
                    && t.lease_until_ms.is_some_and(|u| u >= now)
            })
            .map(|t| format!("{}/{}", t.app, t.timer))
            .collect();
        if running.is_empty() {
            if !client.json {
                println!("no timer runs on {server}");
            }
            return Ok(());
        }
        if !announced && !client.json {
            println!("waiting for {} to end on {server}", running.join(", "));
            announced = true;
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "timers still running on {server} after {timeout:?}: {}; `paddock timer runs APP TIMER` shows them",
                running.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn status(client: &Client) -> anyhow::Result<()> {
    let status: Status = client.get("/v1/status").await?;
    client.print(&status, |status| {
        println!(
            "controller: up, database {}, generation {}",
            status.database, status.generation
        );
        for s in &status.servers {
            let i = &s.server;
            let state = if !s.alive {
                "DOWN (no heartbeat)".to_string()
            } else if s.out_of_date.is_empty() {
                "ok, up to date".to_string()
            } else if !i.deployment {
                format!("ok, deployment off: {}", s.out_of_date.join("; "))
            } else {
                format!("ok, updating: {}", s.out_of_date.join("; "))
            };
            println!(
                "{:<12} zone {:<10} {:<7} deployment {:<3} scheduler {:<3} {state}",
                i.name,
                i.zone,
                i.role.as_str(),
                on_off(i.deployment),
                // A passive server runs no timer, whatever its flag.
                if i.role == Role::Active {
                    on_off(i.scheduler)
                } else {
                    "-"
                }
            );
        }
    })
}

/// `2026-11-22 13:00:00.250` (UTC) of a millisecond timestamp.
pub fn timestamp(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "never".into())
}
