//! Run-time overrides of an app's `[config]` (`/v1/apps/{app}/config`): set by the operator, laid
//! over the manifest's values of whichever version runs, handed to the front-ends in the desired
//! state. A change bumps the generation; each front-end then swaps in the same version with the
//! new values (nothing is compiled again), and requests already running keep the old ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use paddock_api::VersionInfo;
use paddock_core::ManifestError;
use paddock_core::manifest::{check_config, is_config_key};
use serde::{Deserialize, Serialize};

use crate::Controller;
use crate::api::{Failure, audit_change, ensure_zone_free, unknown_app};
use crate::extract::{Json, Path};

type Answer<T> = Result<Json<T>, Failure>;

/// An app's config: the manifest's, the overrides, and what its instances get.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppConfig {
    pub app: String,
    /// The version whose manifest is shown: the desired one, else the newest.
    pub version: String,
    pub manifest: BTreeMap<String, String>,
    pub overrides: BTreeMap<String, String>,
    pub effective: BTreeMap<String, String>,
    /// The generation that carries the change, after a set or unset.
    pub generation: Option<i64>,
    /// Whether `version` is deployed (desired in the app's zone). When not, nothing runs the
    /// app and `waiting_for` is empty.
    pub deployed: bool,
    /// The front-ends of the app's zone (alive, deployment on) that do not report running the
    /// app with `effective` yet: empty once the change is everywhere. A front-end of an older
    /// release, which reports no config, is listed saying so.
    pub waiting_for: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SetConfig {
    pub value: String,
}

/// The manifest's config with the overrides laid over it.
pub(crate) fn effective<'a>(
    manifest: &BTreeMap<String, String>,
    overrides: impl Iterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    let mut config = manifest.clone();
    for (key, value) in overrides {
        config.insert(key.to_string(), value.to_string());
    }
    config
}

/// The version whose manifest counts: the one desired in the app's zone (`true`), else the
/// newest (`false`: nothing runs it).
async fn shown_version(c: &Controller, app: &str) -> Result<(VersionInfo, bool), Failure> {
    let versions = c.store.versions(app).await?;
    let Some(newest) = versions.last() else {
        return Err(unknown_app(app));
    };
    let desired = c
        .store
        .desired(&newest.zone)
        .await?
        .into_iter()
        .find(|v| v.app == app);
    Ok(match desired {
        Some(desired) => (desired, true),
        None => (newest.clone(), false),
    })
}

async fn answer(c: &Controller, app: &str, generation: Option<i64>) -> Answer<AppConfig> {
    let (version, deployed) = shown_version(c, app).await?;
    let overrides: BTreeMap<String, String> = c
        .store
        .config_overrides()
        .await?
        .into_iter()
        .filter(|(a, _, _)| a == app)
        .map(|(_, key, value)| (key, value))
        .collect();
    let manifest = version.manifest.config;
    let effective = effective(
        &manifest,
        overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let digest = paddock_api::config_digest(&effective);
    let now = crate::now_ms();
    let waiting_for = c
        .store
        .servers()
        .await?
        .into_iter()
        .filter(|s| deployed && s.zone == version.zone && s.deployment && crate::api::alive(s, now))
        .filter_map(|s| {
            let runs = s.observed.as_ref().and_then(|o| {
                o.apps
                    .iter()
                    .find(|a| a.name == app && a.version == version.version)
            });
            match runs.map(|a| a.config_digest.as_deref()) {
                Some(Some(runs)) if runs == digest => None,
                Some(None) => Some(format!("{} (an older release: reports no config)", s.name)),
                _ => Some(s.name),
            }
        })
        .collect();
    Ok(Json(AppConfig {
        app: app.to_string(),
        version: version.version,
        manifest,
        overrides,
        effective,
        generation,
        deployed,
        waiting_for,
    }))
}

pub(crate) async fn show(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
) -> Answer<AppConfig> {
    answer(&c, &app, None).await
}

fn bad_config(message: String) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "bad_config", message)
}

/// A key an override may have: a variable name, not Paddock's own.
fn check_key(key: &str) -> Result<(), Failure> {
    if is_config_key(key) {
        return Ok(());
    }
    Err(bad_config(format!(
        "config key {key:?}: use an environment variable name (a letter or '_', then letters, digits and '_', at most 128), not starting with PADDOCK_; nothing changed"
    )))
}

pub(crate) async fn set(
    State(c): State<Arc<Controller>>,
    Path((app, key)): Path<(String, String)>,
    Json(request): Json<SetConfig>,
) -> Answer<AppConfig> {
    check_key(&key)?;
    let (version, _) = shown_version(&c, &app).await?;
    // Checked and written under the zone gate: two changes at once cannot pass the limits
    // together that neither would after the other.
    let _gate = ensure_zone_free(&c, &version.zone).await?;
    // The config with this change must pass what a manifest's would (sizes, values), over the
    // entries an instance gets (an older manifest may hold keys the runtime leaves out).
    let mut config = answer(&c, &app, None).await?.0.effective;
    config.retain(|key, _| is_config_key(key));
    config.insert(key.clone(), request.value.clone());
    if let Err(ManifestError::Field { problem, .. }) = check_config(&config) {
        return Err(bad_config(format!(
            "the config of {app} with {key:?} set {problem}; nothing changed"
        )));
    }
    let generation = c
        .store
        .set_config_override(&app, &key, Some(&request.value))
        .await?
        .unwrap_or(0);
    c.announce(generation);
    audit_change(
        &c,
        "config-set",
        &format!("{app} {key} ({} bytes)", request.value.len()),
    )
    .await;
    answer(&c, &app, Some(generation)).await
}

pub(crate) async fn unset(
    State(c): State<Arc<Controller>>,
    Path((app, key)): Path<(String, String)>,
) -> Answer<AppConfig> {
    check_key(&key)?;
    let (version, _) = shown_version(&c, &app).await?;
    let _gate = ensure_zone_free(&c, &version.zone).await?;
    let Some(generation) = c.store.set_config_override(&app, &key, None).await? else {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "no_override",
            format!(
                "{app} has no override of {key:?}; `paddock config show {app}` shows its config; nothing changed"
            ),
        ));
    };
    c.announce(generation);
    audit_change(&c, "config-unset", &format!("{app} {key}")).await;
    answer(&c, &app, Some(generation)).await
}
