//! The scheduler service: runs the app timers this front-end claims.
//!
//! While its server's scheduler flag is on (from the desired state), it asks the controller
//! for due ticks every [`POLL`] (`POST /control/v1/timers/{name}/claim`). The controller claims
//! them in the store with a lease and a fencing token, so a tick runs on one server only. Each
//! claimed tick invokes the timer's path on this front-end's own copy of the app (not through a
//! balancer), with `x-paddock-timer`, `x-paddock-tick` and `x-paddock-fencing` headers; the
//! lease is renewed while
//! it runs, and the end (2xx or not) is reported with the fencing token. Switched off, it
//! claims nothing new; the runs in flight finish and report, and the controller sees their
//! leases end. On shutdown it claims nothing more and waits for its runs, like the server does
//! for its requests.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use paddock_api::{AppVersionRef, TimerClaim, TimerFinish, TimerLease};
use paddock_runtime::{AppData, RequestData};

use crate::apps::Apps;
use crate::deployer::{ControllerLink, SendToController as _};

/// How often a scheduler that is on asks for due ticks: the upper bound of a tick's start delay.
pub const POLL: Duration = Duration::from_millis(100);
/// How often the leases of running ticks are renewed (the controller's lease is 10 s).
const RENEW: Duration = Duration::from_secs(2);

pub struct Scheduler {
    link: ControllerLink,
    name: String,
    apps: Arc<Apps>,
    http: reqwest::Client,
    /// The server's scheduler flag, as the desired state last said.
    on: Arc<AtomicBool>,
    /// The runs in progress (app, timer, fencing token), renewed until their end is reported.
    running: Mutex<HashSet<(String, String, i64)>>,
    /// Set on shutdown: no new claim.
    stopping: AtomicBool,
    /// Held from a claim's request until its runs are in `running`: `stop` waits for a claim
    /// in flight, so that it never misses the runs that claim brings.
    claiming: tokio::sync::Mutex<()>,
    /// The apps' data; a tick reaches the app's buckets but has no session.
    app_data: Option<Arc<dyn AppData>>,
}

impl Scheduler {
    pub fn new(
        link: ControllerLink,
        name: String,
        apps: Arc<Apps>,
        on: Arc<AtomicBool>,
        app_data: Option<Arc<dyn AppData>>,
    ) -> anyhow::Result<Self> {
        Ok(Scheduler {
            link,
            name,
            apps,
            app_data,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()?,
            on,
            running: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            claiming: tokio::sync::Mutex::new(()),
        })
    }

    fn url(&self, what: &str) -> String {
        self.link
            .controller
            .url(&format!("/control/v1/timers/{}/{what}", self.name))
    }

    /// Claims and runs ticks while the flag is on; never returns.
    pub async fn run(self: Arc<Self>) {
        tokio::spawn(self.clone().renewals());
        let mut failing = false;
        loop {
            tokio::time::sleep(POLL).await;
            let _claiming = self.claiming.lock().await;
            if !self.on.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire) {
                continue;
            }
            // Ticks of the versions served here only: the controller leaves the others to a
            // server that serves them.
            let serving: Vec<AppVersionRef> = self
                .apps
                .loaded()
                .into_iter()
                .map(|a| AppVersionRef {
                    app: a.name,
                    version: a.version,
                })
                .collect();
            let claimed = async {
                let response = self
                    .http
                    .post(self.url("claim"))
                    .json(&serving)
                    .bearer_auth(&self.link.join_token)
                    .timeout(Duration::from_secs(5))
                    .send_to(&self.link.controller)
                    .await?
                    .error_for_status()?;
                anyhow::Ok(response.json::<Vec<TimerClaim>>().await?)
            }
            .await;
            match claimed {
                Ok(claims) => {
                    failing = false;
                    let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    for claim in claims {
                        running.insert((claim.app.clone(), claim.timer.clone(), claim.fencing));
                        tokio::spawn(self.clone().tick(claim));
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("cannot claim timer ticks: {e:#}");
                    }
                    failing = true;
                }
            }
        }
    }

    async fn tick(self: Arc<Self>, claim: TimerClaim) {
        // In `running` since it was claimed.
        let key = (claim.app.clone(), claim.timer.clone(), claim.fencing);
        let started = std::time::Instant::now();
        let (ok, detail) = self.invoke(&claim).await;
        self.report_end(&claim, ok, detail, started).await;
        // Renewed until here: a run whose end is not reported yet keeps its lease.
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    async fn report_end(
        &self,
        claim: &TimerClaim,
        ok: bool,
        detail: String,
        started: std::time::Instant,
    ) {
        if ok {
            tracing::info!(app = %claim.app, timer = %claim.timer, tick_ms = claim.tick_ms, retry = claim.retry, ms = started.elapsed().as_millis() as u64, "timer ran: {detail}");
        } else {
            tracing::warn!(app = %claim.app, timer = %claim.timer, tick_ms = claim.tick_ms, retry = claim.retry, "timer failed: {detail}");
        }
        let finish = TimerFinish {
            lease: TimerLease {
                app: claim.app.clone(),
                timer: claim.timer.clone(),
                fencing: claim.fencing,
            },
            ok,
            detail,
        };
        // The end must reach the controller: until it does, the lease holds the timer.
        for attempt in 0..30 {
            let sent = self
                .http
                .post(self.url("finish"))
                .bearer_auth(&self.link.join_token)
                .timeout(Duration::from_secs(5))
                .json(&finish)
                .send_to(&self.link.controller)
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return,
                Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
                    tracing::warn!(app = %claim.app, timer = %claim.timer, "this run lost its lease; the tick was claimed again elsewhere");
                    return;
                }
                _ if attempt == 29 => {
                    tracing::warn!(app = %claim.app, timer = %claim.timer, "cannot report the end of a timer run; its lease will expire");
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Invokes the timer's path on the app as loaded here: (2xx, what happened).
    async fn invoke(&self, claim: &TimerClaim) -> (bool, String) {
        let Some(version) = self.apps.current(&claim.app) else {
            return (
                false,
                format!("{} is not loaded on {}", claim.app, self.name),
            );
        };
        let served = version.spec().version.clone();
        let request = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(&claim.path)
            .header(hyper::header::HOST, "localhost")
            .header("x-paddock-timer", &claim.timer)
            .header("x-paddock-tick", claim.tick_ms.to_string())
            // Grows with every claim of this timer: an app can refuse the work of a run older
            // than one it has seen (a run that lost its lease during a partition).
            .header("x-paddock-fencing", claim.fencing.to_string())
            .body(http_body_util::Empty::<Bytes>::new());
        let request = match request {
            Ok(request) => request,
            Err(e) => return (false, format!("bad timer path {:?}: {e}", claim.path)),
        };
        let data = self.app_data.clone().map(|store| RequestData {
            store,
            session: None,
        });
        // A run's id in the app's log lines: the timer and its tick.
        let id = format!("{}@{}", claim.timer, claim.tick_ms);
        match self
            .apps
            .runtime()
            .serve(&version, request, &id, data)
            .await
        {
            Ok(response) => {
                let status = response.status();
                // Drain the body, frame by frame without keeping it: the run ends when the app
                // has answered completely, and fails if the body breaks off (a trap or the time
                // limit after the head was sent), whatever the status said.
                let mut body = response.into_body();
                let broken = loop {
                    match http_body_util::BodyExt::frame(&mut body).await {
                        None => break None,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break Some(e),
                    }
                };
                let answered = format!("{} answered {status} ({}@{served})", claim.path, claim.app);
                match broken {
                    None => (status.is_success(), answered),
                    Some(e) => (false, format!("{answered}, then its body broke off: {e:?}")),
                }
            }
            Err(e) => (false, format!("{}@{served}: {e}", claim.app)),
        }
    }

    /// Claims nothing more from now on (a claim in flight still runs what it brings). Called
    /// when the shutdown signal arrives, before the server's drain delay.
    pub fn stop_claiming(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Claims nothing more and waits (at most `timeout`) for the runs in progress to end and
    /// be reported, so that a planned stop loses no run.
    pub async fn stop(&self, timeout: Duration) {
        self.stop_claiming();
        // A claim in flight has put its runs in `running` once this lock is free.
        drop(self.claiming.lock().await);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).len();
            if running == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    running,
                    "stopping with timer runs still in progress; their ticks run again elsewhere after the lease"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn renewals(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RENEW).await;
            let leases: Vec<TimerLease> = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(app, timer, fencing)| TimerLease {
                    app: app.clone(),
                    timer: timer.clone(),
                    fencing: *fencing,
                })
                .collect();
            if leases.is_empty() {
                continue;
            }
            let sent = self
                .http
                .post(self.url("renew"))
                .bearer_auth(&self.link.join_token)
                .timeout(Duration::from_secs(5))
                .json(&leases)
                .send_to(&self.link.controller)
                .await;
            if let Err(e) = sent {
                tracing::warn!("cannot renew timer leases: {e}");
            }
        }
    }
}
