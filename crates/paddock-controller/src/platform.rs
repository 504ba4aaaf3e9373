//! Platform builds: the `paddock` executables a platform upgrade installs on the front-ends.
//!
//! An upload (`POST /v1/platform/builds`, the raw executable) is streamed to a file in
//! `<data>/platform/`, hashed on the way, and checked before it is kept: an ELF executable that
//! runs on this machine and says it is Paddock (`--version`). A build is named by its sha256;
//! its file is `<data>/platform/<sha256>`, its record (version, size) is in the database.
//! Front-ends download it from `GET /control/v1/platform/{sha256}` and check the hash again.
//!
//! The file is on this controller's disk, not in the database: a standby that takes over has
//! the records but not the files, and answers `unknown_build` until the build is uploaded to it.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use paddock_api::{PlatformBuild, PlatformUpgradeRequest};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::api::{BalancedDeployAnswer, Failure};
use crate::extract::{Json, Path};
use crate::ops::{PlanError, short};
use crate::{Controller, now_ms};

pub use paddock_api::BUILD_ENV;

/// A platform build installed over this controller's executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub exe: PathBuf,
    pub build: String,
}

/// The build this process runs: named by the upgrade that started it, or its executable
/// hashed the first time it is asked.
pub async fn own_build(c: &Controller) -> anyhow::Result<String> {
    let mut known = c.build.lock().await;
    if let Some(build) = &*known {
        return Ok(build.clone());
    }
    let build = tokio::task::spawn_blocking(paddock_runtime::sha256_of_this_executable)
        .await
        .context("hashing the executable")?
        .context("hashing the executable")?;
    *known = Some(build.clone());
    Ok(build)
}

/// Installs `build` over this controller's executable, then asks the process to restart on it
/// (see [`crate::Exit::Restart`]).
pub async fn install_here(c: &Controller, build: &PlatformBuild) -> anyhow::Result<()> {
    let source = build_path(c, &build.sha256);
    if !source.is_file() {
        anyhow::bail!(
            "this controller keeps no file for build {} (it took over from the one it was uploaded to?): upload it here (`paddock platform upload PATH`), then `paddock op resume`",
            short(&build.sha256)
        );
    }
    let exe = c.exe.clone().map_err(anyhow::Error::msg)?;
    let dir = exe.parent().context("the executable has no folder")?;
    let temp = temp_beside(&exe, &build.sha256);
    // Another process started from the same file (`paddock up`) may have installed it.
    let on_disk = {
        let exe = exe.clone();
        tokio::task::spawn_blocking(move || paddock_runtime::sha256_file(&exe)).await
    };
    if let Ok(Ok(on_disk)) = on_disk
        && on_disk == build.sha256
    {
        tracing::info!(build = short(&build.sha256), exe = %exe.display(), "platform build found installed; restarting on it");
        c.restarting.send_replace(Some(Installed {
            exe,
            build: build.sha256.clone(),
        }));
        return Ok(());
    }
    let copied = async {
        tokio::fs::copy(&source, &temp).await.with_context(|| {
            format!(
                "cannot write {} beside the executable (the user running the controller must be able to write its folder)",
                temp.display()
            )
        })?;
        use std::os::unix::fs::PermissionsExt as _;
        tokio::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755)).await?;
        tokio::fs::File::open(&temp).await?.sync_all().await?;
        if let Err(e) = paddock_runtime::keep_previous(&exe) {
            tracing::warn!("the executable being replaced is not kept: {e}");
        }
        tokio::fs::rename(&temp, &exe).await.with_context(|| {
            format!(
                "cannot replace {} (the user running the controller must be able to write its folder)",
                exe.display()
            )
        })
    }
    .await;
    if copied.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    copied?;
    if let Ok(folder) = tokio::fs::File::open(dir).await {
        let _ = folder.sync_all().await;
    }
    tracing::info!(build = short(&build.sha256), version = %build.version, exe = %exe.display(), "platform build installed; restarting on it");
    c.restarting.send_replace(Some(Installed {
        exe,
        build: build.sha256.clone(),
    }));
    Ok(())
}

/// Where a build is written before it is renamed over `exe`: beside it (same file system),
/// named for the build and this process, so that processes sharing one executable (`paddock up`)
/// never write the same file.
pub fn temp_beside(exe: &FsPath, sha256: &str) -> PathBuf {
    exe.with_file_name(format!(
        ".paddock-upgrade-{}-{}",
        short(sha256),
        std::process::id()
    ))
}

/// Whether this controller can write beside its executable, as installing a build will: a
/// file is created there and removed.
pub fn can_install_here(c: &Controller, sha256: &str) -> anyhow::Result<()> {
    if !build_path(c, sha256).is_file() {
        anyhow::bail!(
            "it keeps no file for build {} (uploaded to another controller?): upload it here",
            short(sha256)
        );
    }
    let exe = c.exe.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let probe = temp_beside(exe, sha256);
    std::fs::File::create(&probe).with_context(|| {
        format!(
            "cannot write {} (the user running the controller must be able to write the folder of {})",
            probe.display(),
            exe.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether release `a` is older than `b` (`MAJOR.MINOR.PATCH`, a pre-release older than its
/// release). Versions that do not parse are not compared.
pub fn older(a: &str, b: &str) -> bool {
    fn parse(v: &str) -> Option<([u64; 3], bool)> {
        let v = v.split('+').next()?;
        let (core, pre) = match v.split_once('-') {
            Some((core, _)) => (core, true),
            None => (v, false),
        };
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let numbers = [parts.next()??, parts.next()??, parts.next()??];
        Some((numbers, pre))
    }
    match (parse(a), parse(b)) {
        (Some((a, a_pre)), Some((b, b_pre))) => a < b || (a == b && a_pre && !b_pre),
        _ => false,
    }
}

/// The largest executable accepted.
pub const MAX_BUILD_BYTES: u64 = 1 << 30;
/// How long the uploaded executable may take to print its version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where this controller keeps build files.
pub fn dir(c: &Controller) -> PathBuf {
    c.data_dir.join("platform")
}

pub(crate) fn build_path(c: &Controller, sha256: &str) -> PathBuf {
    dir(c).join(sha256)
}

/// Refuses every platform-build request unless the controller takes them.
fn enabled(c: &Controller) -> Result<(), Failure> {
    if c.platform_upgrades {
        return Ok(());
    }
    Err(Failure::new(
        StatusCode::FORBIDDEN,
        "platform_upgrades_off",
        "this controller takes no platform builds (a build is a native executable every server will run): start it with --platform-upgrades to upgrade Paddock this way",
    ))
}

/// `404 unknown_build`, with what to do.
fn unknown_build(sha256: &str, what_to_do: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "unknown_build",
        format!(
            "this controller keeps no platform build {}; {what_to_do}",
            short(sha256)
        ),
    )
}

fn not_elf() -> Failure {
    bad_build(
        "this is not an executable (no ELF header): send the `paddock` executable built for the servers' system",
    )
}

fn bad_build(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "bad_build", message)
}

fn internal(what: &str, e: impl std::fmt::Display) -> Failure {
    tracing::error!("{what}: {e}");
    Failure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what}: {e}"),
    )
}

/// `POST /v1/platform/builds`: keeps an uploaded `paddock` executable.
pub async fn upload(
    State(c): State<Arc<Controller>>,
    body: Body,
) -> Result<(StatusCode, axum::Json<PlatformBuild>), Failure> {
    enabled(&c)?;
    let folder = dir(&c);
    tokio::fs::create_dir_all(&folder)
        .await
        .map_err(|e| internal(&format!("creating {}", folder.display()), e))?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| internal("drawing a file name", e))?;
    let temp = folder.join(format!(".upload-{}", hex::encode(suffix)));
    let result = receive(&c, body, &temp).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    result
}

async fn receive(
    c: &Arc<Controller>,
    mut body: Body,
    temp: &FsPath,
) -> Result<(StatusCode, axum::Json<PlatformBuild>), Failure> {
    let mut file = tokio::fs::File::create(temp)
        .await
        .map_err(|e| internal(&format!("creating {}", temp.display()), e))?;
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(4);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad_build(format!("the upload broke off: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > MAX_BUILD_BYTES {
            return Err(Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload_too_large",
                format!(
                    "the upload is larger than {} MiB: send the `paddock` executable itself",
                    MAX_BUILD_BYTES >> 20
                ),
            ));
        }
        if head.len() < 4 {
            head.extend(data.iter().take(4 - head.len()).copied());
        }
        if head.len() == 4 && head != b"\x7fELF" {
            // Read to the end (so that the client gets the answer), writing nothing.
            continue;
        }
        hash.update(&data);
        file.write_all(&data)
            .await
            .map_err(|e| internal(&format!("writing {}", temp.display()), e))?;
    }
    file.sync_all()
        .await
        .map_err(|e| internal(&format!("writing {}", temp.display()), e))?;
    drop(file);
    if size == 0 {
        return Err(bad_build(
            "the upload is empty: send the `paddock` executable (`paddock upgrade PATH`)",
        ));
    }
    if head != b"\x7fELF" {
        return Err(not_elf());
    }
    let sha256 = hex::encode(hash.finalize());
    let version = version_of(temp).await?;
    let path = build_path(c, &sha256);
    tokio::fs::rename(temp, &path)
        .await
        .map_err(|e| internal(&format!("keeping {}", path.display()), e))?;
    let known = c.store.platform_build(&sha256).await?;
    let build = PlatformBuild {
        sha256: sha256.clone(),
        version,
        size,
        uploaded_ms: known.as_ref().map_or_else(now_ms, |b| b.uploaded_ms),
    };
    if known.is_some() {
        return Ok((StatusCode::OK, axum::Json(build)));
    }
    c.store.put_platform_build(&build).await?;
    c.store
        .audit(
            "admin",
            "platform-upload",
            &format!(
                "build {} (paddock {}, {} bytes)",
                short(&sha256),
                build.version,
                size
            ),
            now_ms(),
        )
        .await?;
    tracing::info!(build = short(&sha256), version = %build.version, size, "platform build kept");
    Ok((StatusCode::CREATED, axum::Json(build)))
}

/// Runs `path --version` and reads Paddock's version from it, or says why it is no Paddock.
async fn version_of(path: &FsPath) -> Result<String, Failure> {
    use paddock_runtime::build::NotPaddock;
    paddock_runtime::build::paddock_version_of(path, VERSION_TIMEOUT)
        .await
        .map_err(|e| match e {
            NotPaddock::Permissions(e) => {
                internal(&format!("making {} executable", path.display()), e)
            }
            NotPaddock::DoesNotRun(_) => bad_build(format!(
                "the executable {e}: build it for the servers' system (or keep --data on a file system that allows running programs)"
            )),
            NotPaddock::TimedOut(_) | NotPaddock::Said { .. } => bad_build(format!(
                "the executable is not Paddock: it {e}; send the `paddock` executable"
            )),
        })
}

/// `GET /v1/platform/builds`: the builds kept, newest first.
pub async fn list(
    State(c): State<Arc<Controller>>,
) -> Result<axum::Json<Vec<PlatformBuild>>, Failure> {
    enabled(&c)?;
    Ok(axum::Json(c.store.platform_builds().await?))
}

/// `GET /v1/platform/builds/{sha256}`: the build, if this controller keeps its file (a
/// controller that took over from the one it was uploaded to has the record, not the file).
pub async fn show(
    State(c): State<Arc<Controller>>,
    Path(sha256): Path<String>,
) -> Result<axum::Json<PlatformBuild>, Failure> {
    enabled(&c)?;
    let unknown = || unknown_build(&sha256, "upload it (`paddock platform upload PATH`)");
    if !paddock_core::is_sha256(&sha256) {
        return Err(unknown());
    }
    match c.store.platform_build(&sha256).await? {
        Some(build) if build_path(&c, &sha256).is_file() => Ok(axum::Json(build)),
        _ => Err(unknown()),
    }
}

/// `DELETE /v1/platform/builds/{sha256}`: forgets a build and removes its file, unless a server
/// is told to run it.
pub async fn remove(
    State(c): State<Arc<Controller>>,
    Path(sha256): Path<String>,
) -> Result<StatusCode, Failure> {
    enabled(&c)?;
    let unknown = || unknown_build(&sha256, "`paddock platform builds` lists them");
    if !paddock_core::is_sha256(&sha256) {
        return Err(unknown());
    }
    let _gate = c.zone_gate.lock().await;
    let told: Vec<String> = c
        .store
        .servers()
        .await?
        .into_iter()
        .filter(|s| s.platform_target.as_deref() == Some(sha256.as_str()))
        .map(|s| s.name)
        .chain(
            c.store
                .balancers(0)
                .await?
                .into_iter()
                .filter(|b| b.platform_target.as_deref() == Some(sha256.as_str()))
                .map(|b| b.report.name),
        )
        .collect();
    let upgrading: Vec<i64> = c
        .store
        .operations(50)
        .await?
        .into_iter()
        .filter(|op| {
            !op.state.is_final()
                && op
                    .plan
                    .platform
                    .as_ref()
                    .is_some_and(|b| b.sha256 == sha256)
        })
        .map(|op| op.id)
        .collect();
    if let Some(id) = upgrading.first() {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "build_in_use",
            format!(
                "operation {id} installs build {}; remove it once the operation has ended",
                short(&sha256)
            ),
        ));
    }
    if !told.is_empty() {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "build_in_use",
            format!(
                "{} {} told to run build {}: a server that comes back installs it from here; upgrade them to another build first",
                told.join(", "),
                if told.len() == 1 { "is" } else { "are" },
                short(&sha256)
            ),
        ));
    }
    if !c.store.remove_platform_build(&sha256).await? {
        return Err(unknown());
    }
    match tokio::fs::remove_file(build_path(&c, &sha256)).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(internal("removing the build's file", e)),
    }
    c.store
        .audit(
            "admin",
            "platform-remove",
            &format!("build {}", short(&sha256)),
            now_ms(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /control/v1/platform/{sha256}`: a build's executable, for a front-end to install.
pub async fn download(
    State(c): State<Arc<Controller>>,
    Path(sha256): Path<String>,
) -> Result<Response, Failure> {
    enabled(&c)?;
    let unknown = || unknown_build(&sha256, "upload it here (`paddock upgrade PATH`)");
    if !paddock_core::is_sha256(&sha256) {
        return Err(unknown());
    }
    let path = build_path(&c, &sha256);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(unknown()),
        Err(e) => return Err(internal(&format!("opening {}", path.display()), e)),
    };
    let size = file
        .metadata()
        .await
        .map_err(|e| internal(&format!("reading {}", path.display()), e))?
        .len();
    let mut response =
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20))
            .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(response)
}

/// `POST /v1/operations/platform-upgrade`: plans a balanced platform upgrade, and starts it.
pub async fn upgrade(
    State(c): State<Arc<Controller>>,
    Json(request): Json<PlatformUpgradeRequest>,
) -> Result<(StatusCode, axum::Json<BalancedDeployAnswer>), Failure> {
    enabled(&c)?;
    let _gate = c.zone_gate.lock().await;
    let plan = crate::ops::plan_upgrade(&c, &request)
        .await
        .map_err(|e| match e {
            PlanError::Invalid(message) => Failure::bad_request("bad_plan", message),
            PlanError::Store(e) => e.into(),
        })?;
    if !build_path(&c, &request.sha256).is_file() {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "unknown_build",
            format!(
                "this controller has the record of build {} but not its file (uploaded to another controller?): upload it here again",
                short(&request.sha256)
            ),
        ));
    }
    if request.plan_only {
        return Ok((
            StatusCode::OK,
            axum::Json(BalancedDeployAnswer {
                plan,
                operation: None,
            }),
        ));
    }
    let operation = crate::ops::start(&c, &plan).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(BalancedDeployAnswer {
            plan,
            operation: Some(operation),
        }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn older_releases_are_told_apart() {
        use super::older;
        assert!(older("0.1.0", "0.2.0"));
        assert!(older("0.9.9", "1.0.0"));
        assert!(older("1.0.0-rc.1", "1.0.0"));
        assert!(!older("1.0.0", "1.0.0"));
        assert!(!older("1.0.1", "1.0.0"));
        assert!(!older("1.10.0", "1.9.0"));
        assert!(!older("weird", "1.0.0"));
    }
}
