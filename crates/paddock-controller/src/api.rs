//! The controller's HTTP surface. Admin API under `/v1/` (admin token), control channel for
//! front-ends under `/control/v1/` (join token), the console's page at `/` (see `console`). JSON
//! in and out; every error is an [`ApiError`] body naming the problem and what to do. Documented
//! in `docs/api.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use paddock_api::{
    ApiError, AppVersionRef, BalancedDeployRequest, BalancerOrders, BalancerReport, DeployPlan,
    DesiredApp, DesiredState, HealthReport, LbState, OpState, Operation, PlatformOrders, Policy,
    Registration, Role, RoutingTable, ServerFlag, ServerInfo, TimerClaim, TimerFinish, TimerInfo,
    TimerLease, TimerRun, VersionInfo,
};
use paddock_core::Manifest;
use paddock_core::manifest::is_valid_name;
use paddock_runtime::sha256_hex;
use paddock_store::{PutOutcome, StoreError};
use serde::{Deserialize, Serialize};

use crate::extract::{Json, Path, Query};
use crate::ops::PlanError;
use crate::routing::RoutingStatus;
use crate::{Controller, now_ms};

/// How long a desired-state long-poll waits for a change before answering "unchanged".
pub const LONG_POLL: Duration = Duration::from_secs(25);

pub fn router(controller: Arc<Controller>) -> Router {
    let admin = Router::new()
        .route("/v1/apps", get(list_apps).post(upload))
        .route("/v1/apps/{name}/versions", get(list_versions))
        .route("/v1/apps/{name}/deploy", post(deploy))
        .route("/v1/apps/{name}/rollback", post(rollback))
        .route("/v1/apps/{name}/config", get(crate::config::show))
        .route(
            "/v1/apps/{name}/config/{key}",
            axum::routing::put(crate::config::set).delete(crate::config::unset),
        )
        .route("/v1/apps/{name}/cache/purge", post(crate::cache::purge))
        .route("/v1/apps/{name}/data", get(crate::data::summary))
        .route("/v1/apps/{name}/data/keys", get(crate::data::keys))
        .route(
            "/v1/apps/{name}/data/value",
            get(crate::data::get_value)
                .put(crate::data::put_value)
                .delete(crate::data::delete_value),
        )
        .route(
            "/v1/apps/{name}/sessions",
            axum::routing::delete(crate::data::end_sessions),
        )
        .route("/v1/servers", get(list_servers))
        .route("/v1/servers/{name}", get(show_server).delete(remove_server))
        .route("/v1/servers/{name}/flags", post(set_flag))
        .route("/v1/servers/{name}/lb", post(set_lb))
        .route("/v1/servers/{name}/role", post(set_role))
        .route("/v1/zones/{zone}/policy", post(set_policy))
        .route("/v1/routing", get(routing_status))
        .route("/v1/standbys", get(crate::standby::list))
        .route("/v1/timers", get(list_timers))
        .route("/v1/timers/{app}/{timer}/runs", get(timer_runs))
        .route("/v1/timers/{app}/{timer}/run", post(run_timer))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/balanced-deploy", post(balanced_deploy))
        .route(
            "/v1/operations/platform-upgrade",
            post(crate::platform::upgrade),
        )
        .route(
            "/v1/platform/builds",
            get(crate::platform::list).post(crate::platform::upload),
        )
        .route(
            "/v1/platform/builds/{sha256}",
            get(crate::platform::show).delete(crate::platform::remove),
        )
        .route("/v1/operations/{id}", get(show_operation))
        .route("/v1/operations/{id}/abort", post(abort_operation))
        .route("/v1/operations/{id}/resume", post(resume_operation))
        .route("/v1/status", get(status))
        .route("/v1/audit", get(audit))
        .layer(DefaultBodyLimit::max(controller.max_upload_bytes))
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_admin,
        ));
    let control = Router::new()
        .route("/control/v1/register", post(register))
        .route("/control/v1/heartbeat/{name}", post(heartbeat))
        .route("/control/v1/desired/{name}", get(desired))
        .route("/control/v1/artifacts/{sha256}", get(artifact))
        .route("/control/v1/components/{sha256}", get(component))
        .route(
            "/control/v1/platform/{sha256}",
            get(crate::platform::download),
        )
        .route("/control/v1/routing", get(routing_table))
        .route("/control/v1/balancers/{name}", post(balancer_report))
        .route("/control/v1/standbys/{name}", post(crate::standby::report))
        .route("/control/v1/timers/{name}/claim", post(claim_timers))
        .route("/control/v1/timers/{name}/renew", post(renew_timers))
        .route("/control/v1/timers/{name}/finish", post(finish_timer))
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_join,
        ));
    admin
        .merge(control)
        .merge(crate::console::router())
        .fallback(|| async {
            Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see docs/api.md",
            )
        })
        .with_state(controller)
}

/// An error answer: status, stable kind, message.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl Failure {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Failure {
        Failure {
            status,
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(kind: &'static str, message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, kind, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.kind.to_string(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let (status, kind) = match &e {
            StoreError::UnknownServer(_) => (StatusCode::NOT_FOUND, "unknown_server"),
            StoreError::UnknownBalancer(_) => (StatusCode::NOT_FOUND, "unknown_balancer"),
            StoreError::UnknownVersion { .. } => (StatusCode::NOT_FOUND, "unknown_version"),
            StoreError::VersionConflict { .. } => (StatusCode::CONFLICT, "version_conflict"),
            StoreError::ZoneConflict { .. } => (StatusCode::CONFLICT, "zone_conflict"),
            StoreError::RouteTaken { .. } => (StatusCode::CONFLICT, "route_taken"),
            StoreError::ZoneBusy { .. } => (StatusCode::CONFLICT, "zone_busy"),
            StoreError::UnknownOperation(_) => (StatusCode::NOT_FOUND, "unknown_operation"),
            StoreError::UnknownTimer { .. } => (StatusCode::NOT_FOUND, "unknown_timer"),
            _ => {
                tracing::error!("store: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, "store_error")
            }
        };
        Failure::new(status, kind, e.to_string())
    }
}

type Answer<T> = Result<Json<T>, Failure>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn require_admin(State(c): State<Arc<Controller>>, request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        Some(token) if crate::tokens::same(token, &c.tokens.admin) => next.run(request).await,
        _ => Failure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token: send `Authorization: Bearer <token>` (the CLI reads PADDOCK_TOKEN or <data>/admin.token)",
        )
        .into_response(),
    }
}

async fn require_join(State(c): State<Arc<Controller>>, request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        Some(token) if crate::tokens::same(token, &c.tokens.join) => next.run(request).await,
        _ => Failure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong join token: start the front-end with --join-token (or PADDOCK_JOIN_TOKEN) from the controller's <data>/join.token",
        )
        .into_response(),
    }
}

// ---- admin: apps ----------------------------------------------------------------------------

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    deploy: bool,
}

/// What `POST /v1/apps` answers.
#[derive(Serialize, Deserialize)]
pub struct Uploaded {
    pub version: VersionInfo,
    /// False when the same name@version with the same content was already stored.
    pub created: bool,
    /// The generation after deploying, when `?deploy=true`.
    pub generation: Option<i64>,
}

async fn upload(
    State(c): State<Arc<Controller>>,
    Query(query): Query<UploadQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Answer<Uploaded> {
    let mut multipart = multipart.map_err(|e| {
        Failure::new(
            e.status(),
            "bad_upload",
            format!(
                "{}; send a multipart form with `manifest` and `component` (`paddock app upload` does)",
                e.body_text()
            ),
        )
    })?;
    let too_big = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload_too_large",
                format!(
                    "the upload is larger than {} bytes; make the component smaller or start the controller with a larger --max-upload-mib",
                    c.max_upload_bytes
                ),
            )
        } else {
            Failure::bad_request(
                "bad_upload",
                format!("the upload is not a valid multipart form: {e}"),
            )
        }
    };
    let (mut manifest_text, mut component) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(too_big)? {
        match field.name() {
            Some("manifest") => manifest_text = Some(field.text().await.map_err(too_big)?),
            Some("component") => component = Some(field.bytes().await.map_err(too_big)?),
            _ => {}
        }
    }
    let (Some(manifest_text), Some(component)) = (manifest_text, component) else {
        return Err(Failure::bad_request(
            "bad_upload",
            "an upload needs two form fields: `manifest` (paddock.toml) and `component` (the .wasm)",
        ));
    };
    let manifest = Manifest::from_toml(&manifest_text)
        .map_err(|e| Failure::bad_request("bad_manifest", e.to_string()))?;
    let sha = sha256_hex(&component);
    let version = manifest.version_for(&sha);

    match c.store.version(&manifest.name, &version).await {
        Ok(existing) if existing.component_sha256 == sha && existing.manifest == manifest => {
            let generation = if query.deploy {
                Some(set_desired(&c, &existing).await?)
            } else {
                None
            };
            return Ok(Json(Uploaded {
                version: existing,
                created: false,
                generation,
            }));
        }
        Ok(_) => {
            return Err(StoreError::VersionConflict {
                app: manifest.name.clone(),
                version,
            }
            .into());
        }
        Err(StoreError::UnknownVersion { .. }) => {}
        Err(e) => return Err(e.into()),
    }

    // Compile once; a component that is not a wasi:http app stops here.
    let artifact = compile(&c, component.clone()).await?.map_err(|e| {
        Failure::bad_request("bad_component", format!("{}: {e}", manifest.component))
    })?;
    let now = now_ms();
    let created = c
        .store
        .put_version(&manifest, &version, &component, &sha, now)
        .await?
        == PutOutcome::Created;
    c.store
        .put_artifact(
            &sha,
            c.runtime.engine_hash(),
            &sha256_hex(artifact.as_bytes()),
            artifact.as_bytes(),
        )
        .await?;
    c.store
        .audit(
            "admin",
            "upload",
            &format!("{}@{version} sha256 {sha}", manifest.name),
            now,
        )
        .await?;
    tracing::info!(app = %manifest.name, %version, "version uploaded and compiled");
    let stored = c.store.version(&manifest.name, &version).await?;
    let generation = if query.deploy {
        Some(set_desired(&c, &stored).await?)
    } else {
        None
    };
    Ok(Json(Uploaded {
        version: stored,
        created,
        generation,
    }))
}

/// Compiles a component on a blocking thread, so that the API keeps answering meanwhile.
async fn compile(
    c: &Controller,
    component: impl AsRef<[u8]> + Send + 'static,
) -> Result<Result<paddock_runtime::Artifact, paddock_runtime::LoadError>, Failure> {
    let runtime = c.runtime.clone();
    tokio::task::spawn_blocking(move || runtime.compile(component.as_ref()))
        .await
        .map_err(|e| {
            Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "compile_failed",
                e.to_string(),
            )
        })
}

/// An app the farm does not know.
pub(crate) fn unknown_app(name: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "unknown_app",
        format!("unknown app {name:?}; `paddock app list` lists the apps"),
    )
}

/// Records an operator's change in the audit log. The change stands whatever happens here, so
/// a failure is logged rather than answered as the change's.
pub(crate) async fn audit_change(c: &Controller, action: &str, detail: &str) {
    if let Err(e) = c.store.audit("admin", action, detail, now_ms()).await {
        tracing::error!("{action} done, but not recorded in the audit log: {e} ({detail})");
    }
}

/// Refuses a manual change to a zone while an operation acts on it: the operation restores
/// exactly what was there before it, and a change in the middle would be lost or undone.
/// Returns the zone gate (see `Controller::zone_gate`): hold it until the change is written.
pub(crate) async fn ensure_zone_free<'c>(
    c: &'c Controller,
    zone: &str,
) -> Result<tokio::sync::MutexGuard<'c, ()>, Failure> {
    let gate = c.zone_gate.lock().await;
    let Some(operation) = c.store.zone_lock(zone).await? else {
        return Ok(gate);
    };
    if c.store.operation(operation).await?.state == OpState::Paused {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "zone_busy",
            format!(
                "operation {operation} holds zone {zone} and is paused past its cutover: {}",
                paused_advice(operation)
            ),
        ));
    }
    Err(StoreError::ZoneBusy {
        zone: zone.to_string(),
        operation,
    }
    .into())
}

/// What an operator can do with an operation paused from step 8 on, where it can only go
/// forward.
fn paused_advice(id: i64) -> String {
    format!(
        "it can only go forward; `paddock op show {id}` names the servers its step waits for: make them take the new version (or stop them), then `paddock op resume {id}`"
    )
}

async fn set_desired(c: &Controller, version: &VersionInfo) -> Result<i64, Failure> {
    let _gate = ensure_zone_free(c, &version.zone).await?;
    let now = now_ms();
    let generation = c
        .store
        .set_desired(&version.app, &version.zone, &version.version, now)
        .await?;
    // Deployed: the front-ends hear of it whatever happens next.
    c.announce(generation);
    let deployed = format!(
        "{}@{} to zone {}",
        version.app, version.version, version.zone
    );
    c.store.audit("admin", "deploy", &deployed, now).await?;
    crate::timers::sync(c).await.map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "timers_not_synced",
            format!(
                "deployed {deployed}, but the timers were not updated to it ({e}); deploy it again to retry"
            ),
        )
    })?;
    tracing::info!(app = %version.app, version = %version.version, zone = %version.zone, generation, "desired version set");
    Ok(generation)
}

async fn list_apps(State(c): State<Arc<Controller>>) -> Answer<Vec<paddock_api::AppSummary>> {
    Ok(Json(c.store.apps().await?))
}

async fn list_versions(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Answer<Vec<VersionInfo>> {
    let versions = c.store.versions(&name).await?;
    if versions.is_empty() {
        return Err(unknown_app(&name));
    }
    Ok(Json(versions))
}

#[derive(Serialize, Deserialize)]
pub struct DeployRequest {
    pub version: String,
}

/// What deploy and rollback answer.
#[derive(Serialize, Deserialize)]
pub struct Deployed {
    pub version: VersionInfo,
    pub generation: i64,
}

async fn deploy(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(request): Json<DeployRequest>,
) -> Answer<Deployed> {
    let version = c.store.version(&name, &request.version).await?;
    let generation = set_desired(&c, &version).await?;
    Ok(Json(Deployed {
        version,
        generation,
    }))
}

#[derive(Serialize, Deserialize, Default)]
pub struct RollbackRequest {
    pub to: Option<String>,
}

async fn rollback(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(request): Json<RollbackRequest>,
) -> Answer<Deployed> {
    let target = match request.to {
        Some(to) => c.store.version(&name, &to).await?,
        None => {
            let versions = c.store.versions(&name).await?;
            let Some(first) = versions.first() else {
                return Err(unknown_app(&name));
            };
            let current = c
                .store
                .desired(&first.zone)
                .await?
                .into_iter()
                .find(|v| v.app == name)
                .ok_or_else(|| {
                    Failure::new(
                        StatusCode::CONFLICT,
                        "not_deployed",
                        format!("{name} was never deployed; nothing to roll back"),
                    )
                })?;
            let at = versions
                .iter()
                .position(|v| v.version == current.version)
                .unwrap_or(0);
            if at == 0 {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    "no_earlier_version",
                    format!(
                        "{name}@{} is its oldest version; name one with --to",
                        current.version
                    ),
                ));
            }
            versions[at - 1].clone()
        }
    };
    let generation = set_desired(&c, &target).await?;
    c.store
        .audit(
            "admin",
            "rollback",
            &format!("{}@{}", target.app, target.version),
            now_ms(),
        )
        .await?;
    Ok(Json(Deployed {
        version: target,
        generation,
    }))
}

// ---- admin: servers -------------------------------------------------------------------------

async fn list_servers(State(c): State<Arc<Controller>>) -> Answer<Vec<ServerInfo>> {
    Ok(Json(c.store.servers().await?))
}

async fn show_server(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Answer<ServerInfo> {
    Ok(Json(c.store.server(&name).await?))
}

#[derive(Serialize, Deserialize)]
pub struct FlagRequest {
    pub flag: ServerFlag,
    pub on: bool,
}

async fn set_flag(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(request): Json<FlagRequest>,
) -> Answer<ServerInfo> {
    let _gate = ensure_zone_free(&c, &c.store.server(&name).await?.zone).await?;
    let generation = c.store.set_flag(&name, request.flag, request.on).await?;
    c.store
        .audit(
            "admin",
            "server-flag",
            &format!(
                "{name} {} {}",
                serde_json::to_string(&request.flag)
                    .unwrap_or_default()
                    .trim_matches('"'),
                if request.on { "on" } else { "off" }
            ),
            now_ms(),
        )
        .await?;
    c.announce(generation);
    Ok(Json(c.store.server(&name).await?))
}

async fn remove_server(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    let server = c.store.server(&name).await?;
    let _gate = ensure_zone_free(&c, &server.zone).await?;
    let stopping = server
        .observed
        .as_ref()
        .is_some_and(|o| o.state == paddock_core::ServerState::Stopping);
    if let Some(heartbeat) = server.heartbeat_ms
        && now_ms() - heartbeat <= ALIVE_WITHIN_MS
        && !stopping
    {
        // It would register again within a second, with its flags reset (`lb ready`).
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "server_alive",
            format!(
                "{name} is alive (last heartbeat {:.1} s ago): stop its `paddock frontend` process first, or it registers again at once, back in traffic; `paddock server {name} lb maint` takes it out of traffic meanwhile",
                (now_ms() - heartbeat) as f64 / 1000.0
            ),
        ));
    }
    let generation = c.store.remove_server(&name).await?;
    c.store
        .audit("admin", "server-remove", &name, now_ms())
        .await?;
    c.announce(generation);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize)]
pub struct LbRequest {
    pub state: LbState,
    /// 1 to 100; unchanged when absent.
    pub weight: Option<u32>,
}

/// Largest weight a front-end can have under the `ratio` policy.
pub const MAX_WEIGHT: u32 = 100;

async fn set_lb(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(request): Json<LbRequest>,
) -> Answer<ServerInfo> {
    if let Some(w) = request.weight
        && !(1..=MAX_WEIGHT).contains(&w)
    {
        return Err(Failure::bad_request(
            "bad_weight",
            format!(
                "weight {w} is out of range: use 1 to {MAX_WEIGHT} (to take a server out, use `lb drain` or `lb maint`)"
            ),
        ));
    }
    let _gate = ensure_zone_free(&c, &c.store.server(&name).await?.zone).await?;
    let generation = c.store.set_lb(&name, request.state, request.weight).await?;
    let weight = request
        .weight
        .map(|w| format!(" weight {w}"))
        .unwrap_or_default();
    c.store
        .audit(
            "admin",
            "server-lb",
            &format!("{name} {}{weight}", request.state.as_str()),
            now_ms(),
        )
        .await?;
    c.announce(generation);
    Ok(Json(c.store.server(&name).await?))
}

#[derive(Serialize, Deserialize)]
pub struct RoleRequest {
    pub role: Role,
}

/// Makes a server active (in rotation, with its scheduler) or passive (standing by: deployed,
/// no traffic, no timers). Activation is refused unless the server serves what its zone should.
async fn set_role(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(request): Json<RoleRequest>,
) -> Answer<ServerInfo> {
    let server = c.store.server(&name).await?;
    let _gate = ensure_zone_free(&c, &server.zone).await?;
    if request.role == Role::Active
        && server.role != Role::Active
        && let Some(why) =
            crate::failover::not_ready(&server, &c.store.desired(&server.zone).await?)
    {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "not_ready",
            format!(
                "{why}: a server is activated once it serves the versions desired in its zone (its deployment service on, `paddock status` shows what it serves); nothing changed"
            ),
        ));
    }
    if request.role == Role::Passive && server.role == Role::Active {
        let others = c
            .store
            .servers()
            .await?
            .into_iter()
            .filter(|s| s.zone == server.zone && s.role == Role::Active && s.name != name)
            .count();
        if others == 0 {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "last_active",
                format!(
                    "{name} is the last active front-end of zone {}: its apps would have nowhere to run; activate another one first (`paddock server OTHER role active`); nothing changed",
                    server.zone
                ),
            ));
        }
    }
    let generation = c.store.set_roles(&[(&name, request.role)]).await?;
    c.store
        .audit(
            "admin",
            "server-role",
            &format!("{name} {}", request.role.as_str()),
            now_ms(),
        )
        .await?;
    c.announce(generation);
    Ok(Json(c.store.server(&name).await?))
}

#[derive(Serialize, Deserialize)]
pub struct PolicyRequest {
    pub policy: Policy,
}

#[derive(Serialize, Deserialize)]
pub struct PolicySet {
    pub zone: String,
    pub policy: Policy,
    pub generation: i64,
    /// Front-ends registered in the zone now: none means the policy waits for the first one
    /// (most often a misspelt zone).
    #[serde(default)]
    pub servers: Option<usize>,
}

async fn set_policy(
    State(c): State<Arc<Controller>>,
    Path(zone): Path<String>,
    Json(request): Json<PolicyRequest>,
) -> Answer<PolicySet> {
    if !is_valid_name(&zone) {
        return Err(Failure::bad_request(
            "bad_zone",
            format!("zone {zone:?} is not valid: use 1 to 63 of a-z, 0-9 and '-'"),
        ));
    }
    let _gate = ensure_zone_free(&c, &zone).await?;
    let generation = c.store.set_zone_policy(&zone, request.policy).await?;
    c.store
        .audit(
            "admin",
            "zone-policy",
            &format!("{zone} {}", request.policy.as_str()),
            now_ms(),
        )
        .await?;
    c.announce(generation);
    let servers = c
        .store
        .servers()
        .await?
        .iter()
        .filter(|s| s.zone == zone)
        .count();
    Ok(Json(PolicySet {
        zone,
        policy: request.policy,
        generation,
        servers: Some(servers),
    }))
}

#[derive(Deserialize)]
struct RoutingStatusQuery {
    /// Ask whether every live balancer applied this generation (default: the current one).
    generation: Option<i64>,
}

async fn routing_status(
    State(c): State<Arc<Controller>>,
    Query(q): Query<RoutingStatusQuery>,
) -> Answer<RoutingStatus> {
    Ok(Json(
        crate::routing::status(c.store.as_ref(), q.generation, now_ms(), ALIVE_WITHIN_MS).await?,
    ))
}

/// `GET /v1/status`: every server with what it serves and what it should serve.
#[derive(Serialize, Deserialize)]
pub struct Status {
    pub generation: i64,
    pub database: String,
    /// Largest upload this controller accepts, in bytes.
    pub max_upload_bytes: usize,
    pub servers: Vec<ServerStatus>,
}

#[derive(Serialize, Deserialize)]
pub struct ServerStatus {
    pub server: ServerInfo,
    /// Whether its last heartbeat (or its registration) is recent (within 5 s).
    pub alive: bool,
    /// One line per app whose loaded version differs from the desired one.
    pub out_of_date: Vec<String>,
}

/// The versions of `desired` that `server` does not report serving, each with the version of
/// its app it serves instead, if any.
pub(crate) fn not_served<'a>(
    server: &'a ServerInfo,
    desired: &'a [VersionInfo],
) -> Vec<(&'a VersionInfo, Option<&'a str>)> {
    let loaded = server
        .observed
        .as_ref()
        .map(|o| o.apps.as_slice())
        .unwrap_or(&[]);
    desired
        .iter()
        .filter_map(|d| {
            let serving = loaded
                .iter()
                .find(|l| l.name == d.app)
                .map(|l| l.version.as_str());
            (serving != Some(d.version.as_str())).then_some((d, serving))
        })
        .collect()
}

/// A server is considered alive when it sent a heartbeat within this long.
pub const ALIVE_WITHIN_MS: i64 = 5_000;

/// Milliseconds since `server` last reported: its last heartbeat, or its registration (a server
/// that has just registered counts as alive until its first heartbeat is due).
pub(crate) fn silent_ms(server: &ServerInfo, now: i64) -> i64 {
    now - server.heartbeat_ms.unwrap_or(server.registered_ms)
}

/// Whether `server` reported within [`ALIVE_WITHIN_MS`].
pub(crate) fn alive(server: &ServerInfo, now: i64) -> bool {
    silent_ms(server, now) <= ALIVE_WITHIN_MS
}

async fn status(State(c): State<Arc<Controller>>) -> Answer<Status> {
    let now = now_ms();
    let mut servers = Vec::new();
    let mut desired_by_zone = std::collections::BTreeMap::new();
    for server in c.store.servers().await? {
        if !desired_by_zone.contains_key(&server.zone) {
            desired_by_zone.insert(server.zone.clone(), c.store.desired(&server.zone).await?);
        }
        let out_of_date = not_served(&server, &desired_by_zone[&server.zone])
            .into_iter()
            .map(|(d, serving)| {
                format!(
                    "{}: serving {}, desired {}",
                    d.app,
                    serving.unwrap_or("nothing"),
                    d.version
                )
            })
            .collect();
        servers.push(ServerStatus {
            alive: alive(&server, now),
            server,
            out_of_date,
        });
    }
    Ok(Json(Status {
        generation: c.store.generation().await?,
        database: c.store.backend().to_string(),
        max_upload_bytes: c.max_upload_bytes,
        servers,
    }))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit(
    State(c): State<Arc<Controller>>,
    Query(q): Query<AuditQuery>,
) -> Answer<Vec<paddock_api::AuditEntry>> {
    Ok(Json(
        c.store
            .audit_log(q.limit.unwrap_or(100).clamp(1, 10_000))
            .await?,
    ))
}

// ---- admin: operations ---------------------------------------------------------------------

/// What `POST /v1/operations/balanced-deploy` answers: the plan, and the operation unless only
/// the plan was asked for.
#[derive(Serialize, Deserialize)]
pub struct BalancedDeployAnswer {
    pub plan: DeployPlan,
    pub operation: Option<Operation>,
}

async fn balanced_deploy(
    State(c): State<Arc<Controller>>,
    Json(request): Json<BalancedDeployRequest>,
) -> Result<(StatusCode, Json<BalancedDeployAnswer>), Failure> {
    // The plan is made from the state its zone locks then protect.
    let _gate = c.zone_gate.lock().await;
    let plan = crate::ops::plan(&c, &request).await.map_err(|e| match e {
        PlanError::Invalid(message) => Failure::bad_request("bad_plan", message),
        PlanError::Store(e) => e.into(),
    })?;
    if request.plan_only {
        return Ok((
            StatusCode::OK,
            Json(BalancedDeployAnswer {
                plan,
                operation: None,
            }),
        ));
    }
    let operation = crate::ops::start(&c, &plan).await?;
    Ok((
        StatusCode::CREATED,
        Json(BalancedDeployAnswer {
            plan,
            operation: Some(operation),
        }),
    ))
}

async fn list_operations(State(c): State<Arc<Controller>>) -> Answer<Vec<Operation>> {
    Ok(Json(c.store.operations(50).await?))
}

async fn show_operation(
    State(c): State<Arc<Controller>>,
    Path(id): Path<i64>,
) -> Answer<Operation> {
    Ok(Json(c.store.operation(id).await?))
}

async fn abort_operation(
    State(c): State<Arc<Controller>>,
    Path(id): Path<i64>,
) -> Answer<Operation> {
    // The driver does not start a step meanwhile: an abort accepted here is seen before the
    // next step, so it never arrives past the point of no return.
    let gate = c.zone_gate.lock().await;
    let op = c.store.operation(id).await?;
    if op.state == OpState::Paused {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "not_running",
            format!(
                "operation {id} is paused past its cutover and cannot be aborted: {}",
                paused_advice(id)
            ),
        ));
    }
    if op.state != OpState::Running {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "not_running",
            format!(
                "operation {id} is {}; only a running operation can be aborted",
                op.state.as_str()
            ),
        ));
    }
    for zone in &op.plan.zones {
        if let crate::ops::Next::Run(step) = crate::ops::next(&op, zone)
            && crate::ops::past_point_of_no_return(step)
        {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "past_point_of_no_return",
                match &op.plan.platform {
                    None => format!(
                        "operation {id} is at step {} in zone {}: the loaded group is taking the new version, so no server runs the old one any more; let it finish, then deploy the old version with `paddock deploy --balanced`",
                        step.as_str(),
                        zone.zone
                    ),
                    Some(_) => format!(
                        "operation {id} is at step {} in zone {}: the loaded group is installing the new build over its executables, so there is no old build to go back to; let it finish (a build that turns out wrong is replaced by upgrading to a fixed one)",
                        step.as_str(),
                        zone.zone
                    ),
                },
            ));
        }
    }
    c.store.request_abort(id, now_ms()).await?;
    drop(gate);
    c.store
        .audit(
            "admin",
            "operation-abort",
            &format!("operation {id}"),
            now_ms(),
        )
        .await?;
    c.facts_changed();
    Ok(Json(c.store.operation(id).await?))
}

async fn resume_operation(
    State(c): State<Arc<Controller>>,
    Path(id): Path<i64>,
) -> Answer<Operation> {
    let op = c.store.operation(id).await?;
    match op.state {
        OpState::Paused => {
            c.store
                .set_operation_state(
                    id,
                    OpState::Running,
                    Some("resumed by the operator"),
                    now_ms(),
                )
                .await?;
            c.store
                .audit(
                    "admin",
                    "operation-resume",
                    &format!("operation {id}"),
                    now_ms(),
                )
                .await?;
        }
        OpState::Running => {}
        state => {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "operation_ended",
                format!("operation {id} ended {}; start a new one", state.as_str()),
            ));
        }
    }
    crate::ops::spawn(c.clone(), id);
    Ok(Json(c.store.operation(id).await?))
}

// ---- admin: timers -------------------------------------------------------------------------

async fn list_timers(State(c): State<Arc<Controller>>) -> Answer<Vec<TimerInfo>> {
    Ok(Json(c.store.timers().await?))
}

#[derive(Deserialize)]
struct RunsQuery {
    limit: Option<i64>,
}

async fn timer_runs(
    State(c): State<Arc<Controller>>,
    Path((app, timer)): Path<(String, String)>,
    Query(q): Query<RunsQuery>,
) -> Answer<Vec<TimerRun>> {
    if !c
        .store
        .timers()
        .await?
        .iter()
        .any(|t| t.app == app && t.timer == timer)
    {
        return Err(StoreError::UnknownTimer { app, timer }.into());
    }
    Ok(Json(
        c.store
            .timer_runs(&app, &timer, q.limit.unwrap_or(50).clamp(1, 10_000))
            .await?,
    ))
}

async fn run_timer(
    State(c): State<Arc<Controller>>,
    Path((app, timer)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    c.store.run_timer_now(&app, &timer, now_ms()).await?;
    c.store
        .audit("admin", "timer-run", &format!("{app}/{timer}"), now_ms())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- control channel ------------------------------------------------------------------------

async fn register(
    State(c): State<Arc<Controller>>,
    Json(registration): Json<Registration>,
) -> Answer<ServerInfo> {
    for (field, value) in [("name", &registration.name), ("zone", &registration.zone)] {
        if !is_valid_name(value) {
            return Err(Failure::bad_request(
                "bad_registration",
                format!("server {field} {value:?} is not valid: use 1 to 63 of a-z, 0-9 and '-'"),
            ));
        }
    }
    // A server moving to another zone leaves one plan and enters another: not while an
    // operation holds either (it is retried, and registers once the operation has ended).
    let gate = c.zone_gate.lock().await;
    let known = match c.store.server(&registration.name).await {
        Ok(known) => Some(known),
        Err(StoreError::UnknownServer(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(known) = known
        && known.zone != registration.zone
    {
        for zone in [&known.zone, &registration.zone] {
            if let Some(operation) = c.store.zone_lock(zone).await? {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    "zone_busy",
                    format!(
                        "{} moves from zone {} to {} while operation {operation} holds zone {zone}; it registers once the operation has ended",
                        registration.name, known.zone, registration.zone
                    ),
                ));
            }
        }
    }
    let mut last = c.incarnation(&registration.name).await;
    let server = c.store.register_server(&registration, now_ms()).await?;
    *last = registration.incarnation.clone();
    drop(last);
    drop(gate);
    if let Some(operation) = c.store.zone_lock(&server.zone).await?
        && server.heartbeat_ms.is_none()
    {
        // New to the farm (it has never sent a heartbeat): the store put it in drain with its
        // scheduler off, since the operation's plan does not know it.
        tracing::warn!(server = %server.name, zone = %server.zone, operation, "front-end registered while an operation holds its zone: it is in drain with its scheduler off; `paddock server {0} lb ready` and `paddock server {0} scheduler on` once the operation has ended", server.name);
    }
    // The routing table lists it: wake the balancers.
    c.announce(c.store.generation().await?);
    tracing::info!(server = %server.name, zone = %server.zone, address = %server.address, "front-end registered");
    Ok(Json(server))
}

async fn heartbeat(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(report): Json<HealthReport>,
) -> Result<StatusCode, Failure> {
    if report.server != name {
        return Err(Failure::bad_request(
            "bad_heartbeat",
            format!(
                "a heartbeat for {name:?} reports server {:?}; a front-end reports for itself only",
                report.server
            ),
        ));
    }
    let last = c.incarnation(&name).await;
    if let (Some(sent_by), Some(last)) = (&report.incarnation, &*last)
        && sent_by != last
    {
        // From a process that a newer one of the server replaced: its report is older.
        tracing::debug!(server = %name, "ignoring a heartbeat of a replaced process");
        return Ok(StatusCode::NO_CONTENT);
    }
    c.store.heartbeat(&name, &report, now_ms()).await?;
    drop(last);
    c.facts_changed();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct DesiredQuery {
    /// Answer once the generation is past this one (or after the long-poll time).
    after: Option<i64>,
}

async fn desired(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Query(q): Query<DesiredQuery>,
) -> Answer<DesiredState> {
    let mut changes = c.watch_generation();
    if let Some(after) = q.after {
        // Wait for a newer generation than the caller has, or the long-poll deadline.
        c.long_poll(changes.wait_for(|g| *g > after)).await;
    }
    // The generation is read first: a change committed after this read is announced again, so
    // the caller fetches once more rather than recording a generation it has not seen.
    let generation = c.store.generation().await?;
    let zone = c.store.server(&name).await?.zone;
    let desired = c.store.desired(&zone).await?;
    // The flags are read after the versions: an operation switches a server's deployment
    // service off before it changes the versions, so a server never sees the new versions
    // together with the flag from before.
    let server = c.store.server(&name).await?;
    let overrides = c.store.config_overrides().await?;
    let apps = desired
        .into_iter()
        .map(|v| DesiredApp {
            config: crate::config::effective(
                &v.manifest.config,
                overrides
                    .iter()
                    .filter(|(app, _, _)| *app == v.app)
                    .map(|(_, key, value)| (key.as_str(), value.as_str())),
            ),
            name: v.app,
            version: v.version,
            route: v.manifest.route.clone(),
            component_sha256: v.component_sha256,
            limits: v.manifest.limits,
        })
        .collect();
    Ok(Json(DesiredState {
        generation,
        deployment: server.deployment,
        apps,
        lb: server.lb,
        // A passive server stands by without its scheduler, whatever its flag says.
        scheduler: server.scheduler && server.role == Role::Active,
        platform: match &server.platform_target {
            Some(sha256) => c.store.platform_build(sha256).await?,
            None => None,
        },
        platform_generation: server.platform_target_generation.unwrap_or(0),
    }))
}

#[derive(Deserialize)]
struct RoutingQuery {
    /// Answer once the generation is past this one (or after the long-poll time).
    after: Option<i64>,
}

/// The balancers' long-poll: the routing table, once it is newer than the caller's.
async fn routing_table(
    State(c): State<Arc<Controller>>,
    Query(q): Query<RoutingQuery>,
) -> Answer<RoutingTable> {
    let mut changes = c.watch_generation();
    if let Some(after) = q.after {
        c.long_poll(changes.wait_for(|g| *g > after)).await;
    }
    Ok(Json(crate::routing::table(c.store.as_ref()).await?))
}

/// A balancer's heartbeat and acknowledgement of the generation it routes by.
async fn balancer_report(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(report): Json<BalancerReport>,
) -> Answer<BalancerOrders> {
    if report.name != name || !is_valid_name(&name) {
        return Err(Failure::bad_request(
            "bad_report",
            format!(
                "a report for {name:?} names balancer {:?}; a balancer reports for itself, under a name of 1 to 63 of a-z, 0-9 and '-'",
                report.name
            ),
        ));
    }
    c.store.balancer_report(&report, now_ms()).await?;
    c.facts_changed();
    let platform = match c.store.balancer_target(&name).await? {
        Some((build, generation)) => PlatformOrders {
            platform: Some(build),
            platform_generation: generation,
        },
        None => PlatformOrders::default(),
    };
    Ok(Json(BalancerOrders {
        platform,
        report_within_ms: c.watching().then_some(crate::ops::WATCH_REPORT_MS),
    }))
}

/// A scheduler service asks for due ticks; none while its server's scheduler is off.
async fn claim_timers(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(serving): Json<Vec<AppVersionRef>>,
) -> Answer<Vec<TimerClaim>> {
    let serving: Vec<(String, String)> = serving.into_iter().map(|v| (v.app, v.version)).collect();
    let claims = c
        .store
        .claim_timers(
            &name,
            &serving,
            now_ms(),
            crate::timers::LEASE_MS,
            crate::timers::CLAIM_LIMIT,
        )
        .await?;
    if !claims.is_empty() {
        c.facts_changed();
    }
    Ok(Json(claims))
}

async fn renew_timers(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(leases): Json<Vec<TimerLease>>,
) -> Result<StatusCode, Failure> {
    c.store
        .renew_timers(&name, &leases, now_ms() + crate::timers::LEASE_MS)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn finish_timer(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(finish): Json<TimerFinish>,
) -> Result<StatusCode, Failure> {
    let kept = c.store.finish_timer(&name, &finish, now_ms()).await?;
    c.facts_changed();
    if !kept {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "lease_lost",
            format!(
                "the run of {}/{} with fencing token {} was already ended as lost: its lease expired and the tick was claimed again",
                finish.lease.app, finish.lease.timer, finish.lease.fencing
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

fn check_sha256(sha256: &str) -> Result<(), Failure> {
    if paddock_core::is_sha256(sha256) {
        return Ok(());
    }
    Err(Failure::bad_request(
        "bad_sha256",
        format!("{sha256:?} is not a sha256 (64 lowercase hex digits)"),
    ))
}

async fn stored_component(c: &Controller, sha256: &str) -> Result<Vec<u8>, Failure> {
    c.store.component(sha256).await?.ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "unknown_component",
            format!("no component with sha256 {sha256}"),
        )
    })
}

/// A component as uploaded, for a server whose engine this controller does not compile for: it
/// compiles the component itself (and checks it against its sha256, the name it asked by).
async fn component(
    State(c): State<Arc<Controller>>,
    Path(sha256): Path<String>,
) -> Result<Response, Failure> {
    check_sha256(&sha256)?;
    let bytes = stored_component(&c, &sha256).await?;
    let mut response = bytes.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    Ok(response)
}

#[derive(Deserialize)]
struct ArtifactQuery {
    engine: String,
}

/// The artifact of a component for the caller's engine; compiled now if this controller's engine
/// is the one asked for and it has none yet.
async fn artifact(
    State(c): State<Arc<Controller>>,
    Path(sha256): Path<String>,
    Query(q): Query<ArtifactQuery>,
) -> Result<Response, Failure> {
    check_sha256(&sha256)?;
    let found = c.store.artifact(&sha256, &q.engine).await?;
    let (artifact_sha, bytes) = match found {
        Some(found) => found,
        None if q.engine == c.runtime.engine_hash() => {
            let component = stored_component(&c, &sha256).await?;
            let artifact = compile(&c, component).await?.map_err(|e| {
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "compile_failed",
                    e.to_string(),
                )
            })?;
            let artifact_sha = sha256_hex(artifact.as_bytes());
            c.store
                .put_artifact(&sha256, &q.engine, &artifact_sha, artifact.as_bytes())
                .await?;
            (artifact_sha, artifact.as_bytes().to_vec())
        }
        None => {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "engine_mismatch",
                format!(
                    "no artifact for engine {}; this controller compiles for engine {} (another Paddock release or another CPU): compile the component from GET /control/v1/components/{sha256}",
                    q.engine,
                    c.runtime.engine_hash()
                ),
            ));
        }
    };
    let mut response = bytes.into_response();
    if let Ok(v) = HeaderValue::from_str(&artifact_sha) {
        response
            .headers_mut()
            .insert("x-paddock-artifact-sha256", v);
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}
