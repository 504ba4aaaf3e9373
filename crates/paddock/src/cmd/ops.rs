//! `paddock deploy` and `paddock op`: deployments and the journaled operations the controller
//! runs, followed live.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use paddock_api::{
    AppVersionRef, BalancedDeployRequest, DeployPlan, OpState, OpStep, Operation, PlatformBuild,
    PlatformUpgradeRequest, StepState,
};
use paddock_controller::api::{BalancedDeployAnswer, DeployRequest, Deployed};

use super::admin::Client;

#[derive(clap::Args)]
pub struct DeployArgs {
    /// What to deploy: APP@VERSION (an uploaded version) or a package folder (uploaded first).
    #[arg(required = true, value_name = "APP@VERSION|PATH")]
    apps: Vec<String>,
    /// Balanced deployment: update half of each zone's front-ends out of traffic, smoke-test
    /// them, move every user over at once, then update the other half. Without it, every
    /// front-end hot-swaps in place.
    #[arg(long)]
    balanced: bool,
    /// Only deploy apps of this zone (refuse the others).
    #[arg(long, requires = "balanced")]
    zone: Option<String>,
    /// The front-ends to update first (default: the first half of each zone, by name).
    #[arg(long, value_delimiter = ',', requires = "balanced")]
    updating: Vec<String>,
    /// Run the zones side by side instead of one after another.
    #[arg(long, requires = "balanced")]
    parallel_zones: bool,
    /// Print the procedure with the real server names, and change nothing.
    #[arg(long, requires = "balanced")]
    plan: bool,
    /// Start the operation and return its id without following it.
    #[arg(long, requires = "balanced")]
    detach: bool,
    /// How long each wait may take (balanced) or the whole rollout (in place).
    #[arg(long, default_value = "2m", value_parser = crate::positive_duration)]
    timeout: Duration,
    #[command(flatten)]
    watch: WatchArgs,
}

/// The watch step of a balanced deployment or platform upgrade.
#[derive(clap::Args)]
pub struct WatchArgs {
    /// After each zone's cutover, count users' answers through the balancers for this long
    /// (e.g. 30s); too many 5xx answers fail the step and put users back on the old versions.
    /// Without it there is no watch step.
    #[arg(long, value_parser = crate::positive_duration)]
    watch: Option<Duration>,
    /// The share of watched answers that may fail (5xx) before users are put back, to a
    /// tenth of a percent.
    #[arg(long, default_value = "1%", value_parser = share, requires = "watch")]
    max_failed: u32,
}

impl WatchArgs {
    fn watch(&self) -> Option<paddock_api::Watch> {
        self.watch.map(|window| paddock_api::Watch {
            ms: window.as_millis() as u64,
            max_failed_permille: self.max_failed,
        })
    }
}

fn share(text: &str) -> Result<u32, String> {
    paddock_api::Watch::parse_percent(text)
        .ok_or_else(|| "give a share from 0% to 100%, to a tenth (e.g. 1%, 0.5%)".into())
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The new `paddock` executable (uploaded to the controller first), or the sha256 of a
    /// build uploaded before.
    #[arg(value_name = "PATH|SHA256")]
    build: String,
    /// Only upgrade the front-ends of this zone.
    #[arg(long)]
    zone: Option<String>,
    /// The front-ends to upgrade first (default: the first half of each zone, by name).
    #[arg(long, value_delimiter = ',')]
    updating: Vec<String>,
    /// Run the zones side by side instead of one after another.
    #[arg(long)]
    parallel_zones: bool,
    /// Print the procedure with the real server names, and change nothing (the executable is
    /// still uploaded and checked).
    #[arg(long)]
    plan: bool,
    /// Start the operation and return its id without following it.
    #[arg(long)]
    detach: bool,
    /// How long each wait may take.
    #[arg(long, default_value = "2m", value_parser = crate::positive_duration)]
    timeout: Duration,
    #[command(flatten)]
    watch: WatchArgs,
}

#[derive(clap::Subcommand)]
pub enum PlatformCommand {
    /// The builds the controller keeps, newest first.
    Builds,
    /// Upload a `paddock` executable without upgrading anything.
    Upload { path: PathBuf },
    /// Forget a build and remove its file (refused while a server is told to run it).
    Remove { sha256: String },
}

#[derive(clap::Subcommand)]
pub enum OpCommand {
    /// The newest operations.
    List,
    /// One operation with its journal: each step, its servers, timing and the facts it saw.
    Show { id: i64 },
    /// Follow an operation live until it ends.
    Watch { id: i64 },
    /// Stop a running operation and put everything back (only before the loaded group takes
    /// the new version).
    Abort { id: i64 },
    /// Retry the step a paused operation stopped at.
    Resume { id: i64 },
}

/// An argument of `paddock deploy`: a stored version or a package folder.
enum Target {
    Stored(AppVersionRef),
    Package(PathBuf),
}

fn parse_target(arg: &str) -> anyhow::Result<Target> {
    let path = Path::new(arg);
    if path.join("paddock.toml").is_file() {
        return Ok(Target::Package(path.to_path_buf()));
    }
    match arg.split_once('@') {
        Some((app, version)) if !app.is_empty() && !version.is_empty() && !arg.contains('/') => {
            Ok(Target::Stored(AppVersionRef {
                app: app.into(),
                version: version.into(),
            }))
        }
        _ if path.exists() => anyhow::bail!(
            "{arg} holds no paddock.toml; name a package folder or an uploaded APP@VERSION"
        ),
        _ => anyhow::bail!(
            "{arg:?} is neither an uploaded APP@VERSION (`paddock app versions APP` lists them) nor a package folder"
        ),
    }
}

/// The name@version a package folder will be stored under, computed as the controller does.
fn package_version(path: &Path) -> anyhow::Result<AppVersionRef> {
    let manifest_path = path.join("paddock.toml");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = paddock_core::Manifest::from_toml(&text)
        .with_context(|| manifest_path.display().to_string())?;
    let component = std::fs::read(path.join(&manifest.component))
        .with_context(|| format!("reading the component {}", manifest.component))?;
    let version = manifest.version_for(&paddock_runtime::sha256_hex(&component));
    Ok(AppVersionRef {
        app: manifest.name,
        version,
    })
}

pub async fn deploy(client: &Client, args: DeployArgs) -> anyhow::Result<()> {
    let targets = args
        .apps
        .iter()
        .map(|a| parse_target(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !args.balanced && args.watch.watch.is_some() {
        anyhow::bail!(
            "--watch watches users after a cutover, which only a balanced deployment has; add --balanced"
        );
    }
    if !args.balanced {
        let mut deployed = Vec::new();
        for target in targets {
            let version = match target {
                Target::Package(path) => client.upload(&path, true).await?.version,
                Target::Stored(v) => {
                    let deployed: Deployed = client
                        .post(
                            &format!("/v1/apps/{}/deploy", v.app),
                            &DeployRequest { version: v.version },
                        )
                        .await?;
                    deployed.version
                }
            };
            if !client.json {
                println!(
                    "{}@{} deploying in place to zone {}",
                    version.app, version.version, version.zone
                );
            }
            super::admin::wait_rollout(client, &version, args.timeout).await?;
            deployed.push(version);
        }
        // With --json: the versions now served, as `paddock app versions` shows them.
        return client.print(&deployed, |_| {});
    }

    let mut apps = Vec::new();
    for target in targets {
        apps.push(match target {
            Target::Stored(v) => v,
            Target::Package(path) if args.plan => package_version(&path)?,
            Target::Package(path) => {
                let uploaded = client.upload(&path, false).await?;
                if !client.json {
                    println!(
                        "{}@{} {}",
                        uploaded.version.app,
                        uploaded.version.version,
                        if uploaded.created {
                            "uploaded and compiled"
                        } else {
                            "already stored"
                        }
                    );
                }
                AppVersionRef {
                    app: uploaded.version.app,
                    version: uploaded.version.version,
                }
            }
        });
    }
    let request = BalancedDeployRequest {
        apps: apps.clone(),
        zone: args.zone,
        updating: args.updating,
        parallel_zones: args.parallel_zones,
        plan_only: args.plan,
        timeout_ms: Some(args.timeout.as_millis() as u64),
        watch: args.watch.watch(),
    };
    let answer: BalancedDeployAnswer = client
        .post("/v1/operations/balanced-deploy", &request)
        .await
        .map_err(|e| {
            if args.plan && e.to_string().starts_with("unknown app version") {
                e.context("`--plan` uploads nothing: store the package first with `paddock app upload PATH`")
            } else {
                e
            }
        })?;
    follow(client, answer, args.detach).await
}

/// Uploads a `paddock` executable; the controller checks that it runs and says its version.
async fn upload_build(client: &Client, path: &Path) -> anyhow::Result<PlatformBuild> {
    if !path.is_file() {
        anyhow::bail!(
            "{}: no such file; give the new `paddock` executable (or the sha256 of a build `paddock platform builds` lists)",
            path.display()
        );
    }
    // Asked first: a controller that takes no builds answers before a byte is sent, instead of
    // closing the connection under an upload it refused (which reads as "cannot reach"); and
    // a build whose file it keeps already is not sent again.
    let _: Vec<PlatformBuild> = client.get("/v1/platform/builds").await?;
    let file = path.to_path_buf();
    let sha256 = tokio::task::spawn_blocking(move || paddock_runtime::sha256_file(&file))
        .await
        .context("hashing the build")?
        .with_context(|| format!("reading {}", path.display()))?;
    let kept: Option<PlatformBuild> = client
        .get(&format!("/v1/platform/builds/{sha256}"))
        .await
        .ok();
    let (build, already) = match kept {
        Some(build) => (build, "already "),
        None => (client.post_file("/v1/platform/builds", path).await?, ""),
    };
    if !client.json {
        println!(
            "build {} (paddock {}, {:.1} MB) {already}kept by the controller",
            &build.sha256[..12.min(build.sha256.len())],
            build.version,
            build.size as f64 / 1e6
        );
    }
    Ok(build)
}

pub async fn platform(client: &Client, command: PlatformCommand) -> anyhow::Result<()> {
    match command {
        PlatformCommand::Builds => {
            let builds: Vec<PlatformBuild> = client.get("/v1/platform/builds").await?;
            client.print(&builds, |builds| {
                println!("{:<66} {:<12} {:>10}", "SHA256", "VERSION", "MB");
                for b in builds {
                    println!(
                        "{:<66} {:<12} {:>10.1}",
                        b.sha256,
                        b.version,
                        b.size as f64 / 1e6
                    );
                }
            })
        }
        PlatformCommand::Upload { path } => {
            let build = upload_build(client, &path).await?;
            client.print(&build, |_| {})
        }
        PlatformCommand::Remove { sha256 } => {
            if !paddock_core::is_sha256(&sha256) {
                anyhow::bail!(
                    "{sha256:?} is no build: give the sha256 `paddock platform builds` lists"
                );
            }
            client
                .delete(&format!("/v1/platform/builds/{sha256}"))
                .await?;
            client.print(&sha256, |sha| println!("build {sha} removed"))
        }
    }
}

pub async fn upgrade(client: &Client, args: UpgradeArgs) -> anyhow::Result<()> {
    let is_sha = args.build.len() == 64 && args.build.bytes().all(|b| b.is_ascii_hexdigit());
    let sha256 = if is_sha && !Path::new(&args.build).exists() {
        args.build.to_ascii_lowercase()
    } else {
        upload_build(client, Path::new(&args.build)).await?.sha256
    };
    let request = PlatformUpgradeRequest {
        sha256,
        zone: args.zone,
        updating: args.updating,
        parallel_zones: args.parallel_zones,
        plan_only: args.plan,
        timeout_ms: Some(args.timeout.as_millis() as u64),
        watch: args.watch.watch(),
    };
    let answer: BalancedDeployAnswer = client
        .post("/v1/operations/platform-upgrade", &request)
        .await?;
    follow(client, answer, args.detach).await
}

/// Prints a plan, or follows the operation it started.
async fn follow(client: &Client, answer: BalancedDeployAnswer, detach: bool) -> anyhow::Result<()> {
    let Some(operation) = answer.operation else {
        return client.print(&answer.plan, |plan| print_plan(plan, true));
    };
    if detach {
        return client.print(&operation, |op| {
            println!(
                "operation {} started; `paddock op watch {}` follows it",
                op.id, op.id
            )
        });
    }
    if !client.json {
        print_plan(&answer.plan, false);
        println!();
        println!(
            "operation {} started (`paddock op abort {}` stops it before the loaded group is {})",
            operation.id,
            operation.id,
            if answer.plan.platform.is_some() {
                "upgraded"
            } else {
                "updated"
            }
        );
    }
    watch(client, operation.id).await
}

pub async fn op(client: &Client, command: OpCommand) -> anyhow::Result<()> {
    match command {
        OpCommand::List => {
            let ops: Vec<Operation> = client.get("/v1/operations").await?;
            client.print(&ops, |ops| {
                println!(
                    "{:>4} {:<16} {:<10} {:<12} {:>9} {:<24} WHAT",
                    "ID", "KIND", "STATE", "ZONES", "DURATION", "STEP"
                );
                for op in ops {
                    let step = op
                        .steps
                        .last()
                        .map(|s| format!("{} {}", s.step.as_str(), s.state.as_str()))
                        .unwrap_or_default();
                    println!(
                        "{:>4} {:<16} {:<10} {:<12} {:>9} {:<24} {}",
                        op.id,
                        op.kind,
                        op.state.as_str(),
                        op.zones.join(","),
                        duration(op.created_ms, op.ended_ms.unwrap_or(op.updated_ms)),
                        step,
                        what(&op.plan)
                    );
                }
            })
        }
        OpCommand::Show { id } => {
            let op: Operation = client.get(&format!("/v1/operations/{id}")).await?;
            client.print(&op, print_operation)
        }
        OpCommand::Watch { id } => watch(client, id).await,
        OpCommand::Abort { id } => {
            let op: Operation = client
                .post(&format!("/v1/operations/{id}/abort"), &())
                .await?;
            if !client.json {
                println!("abort requested; putting everything back:");
            }
            watch(client, op.id).await
        }
        OpCommand::Resume { id } => {
            let op: Operation = client
                .post(&format!("/v1/operations/{id}/resume"), &())
                .await?;
            if !client.json {
                println!("operation {id} resumed:");
            }
            watch(client, op.id).await
        }
    }
}

/// "hello v1→v2, shop v3→v4", or the build a platform upgrade installs.
fn what(plan: &DeployPlan) -> String {
    if let Some(build) = &plan.platform {
        return format!(
            "paddock {} (build {})",
            build.version,
            &build.sha256[..12.min(build.sha256.len())]
        );
    }
    plan.zones
        .iter()
        .flat_map(|z| {
            z.apps
                .iter()
                .map(|a| format!("{} {}→{}", a.app, a.from, a.to))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_plan(plan: &DeployPlan, plan_only: bool) {
    let upgrade = plan.platform.is_some();
    if plan_only {
        println!(
            "Balanced {} plan (nothing was changed; run it without --plan):",
            if upgrade {
                "platform upgrade"
            } else {
                "deployment"
            }
        );
    }
    if upgrade {
        println!("{}", what(plan));
    }
    for zone in &plan.zones {
        println!();
        let apps: Vec<String> = zone
            .apps
            .iter()
            .map(|a| {
                if upgrade {
                    format!("{}@{} (smoke {})", a.app, a.to, a.smoke)
                } else {
                    format!("{} {} → {} (smoke {})", a.app, a.from, a.to, a.smoke)
                }
            })
            .collect();
        println!("zone {}: {}", zone.zone, apps.join(", "));
        if zone.in_place && upgrade {
            println!(
                "  one serving front-end ({}): restarts in place; requests wait for it meanwhile",
                zone.updating.join(", ")
            );
        } else if zone.in_place {
            println!(
                "  one serving front-end ({}): hot deploy in place, no cutover",
                zone.updating.join(", ")
            );
        } else {
            println!("  updating: {}", zone.updating.join(", "));
            println!("  loaded:   {}", zone.loaded.join(", "));
        }
        if !zone.untouched.is_empty() {
            println!("  left alone: {}", zone.untouched.join(", "));
        }
        for (n, step) in zone.steps.iter().enumerate() {
            println!(
                "  {:>2}. {:<22} {:<24} {}",
                n + 1,
                step.step.as_str(),
                step.servers.join(","),
                step.step.describe()
            );
        }
    }
    println!();
    println!(
        "Each wait fails after {} s; a failure before {} puts everything back.{}",
        plan.timeout_ms / 1000,
        if upgrade {
            "upgrade-loaded".to_string()
        } else {
            // Its number in the zones' lists (one more with a watch step).
            match plan.zones.iter().find_map(|z| {
                z.steps
                    .iter()
                    .position(|s| s.step == paddock_api::Step::DeploymentOn)
            }) {
                Some(i) => format!("step {} (deployment-on)", i + 1),
                None => "deployment-on".to_string(),
            }
        },
        if plan.parallel_zones && plan.zones.len() > 1 {
            " Zones run side by side."
        } else {
            ""
        }
    );
    if let Some(watch) = &plan.watch {
        println!(
            "The watch step counts users' answers for {} s; more than {} failed (5xx) for an app puts users back on the old versions.",
            watch.ms as f64 / 1000.0,
            watch.max_failed()
        );
    }
}

fn print_operation(op: &Operation) {
    println!(
        "operation {} ({}): {} — {}",
        op.id,
        op.kind,
        op.state.as_str(),
        what(&op.plan)
    );
    println!(
        "  started {} UTC, {}",
        super::admin::timestamp(op.created_ms),
        match op.ended_ms {
            Some(end) => format!("ended after {}", duration(op.created_ms, end)),
            None => format!("running for {}", duration(op.created_ms, now_ms())),
        }
    );
    if let Some(message) = &op.message {
        println!("  {message}");
    }
    for step in &op.steps {
        print_step(step, true);
    }
}

fn print_step(step: &OpStep, facts: bool) {
    let took = match step.ended_ms {
        Some(end) => duration(step.started_ms, end),
        None => "…".into(),
    };
    let again = if step.attempts > 1 {
        format!(" (attempt {})", step.attempts)
    } else {
        String::new()
    };
    println!(
        "  {:<8} {:<22} {:<8} {:>8}  {}{again}",
        step.zone,
        step.step.as_str(),
        step.state.as_str(),
        took,
        step.servers.join(",")
    );
    if let Some(message) = &step.message {
        println!("           ! {message}");
    }
    if facts {
        for fact in &step.facts {
            println!("           · {fact}");
        }
    }
}

/// Prints each step as it starts and ends until the operation ends; fails unless it succeeded.
async fn watch(client: &Client, id: i64) -> anyhow::Result<()> {
    let mut shown: HashMap<(String, String), (StepState, i64)> = HashMap::new();
    let mut errors = 0;
    loop {
        let op: Operation = match client.get(&format!("/v1/operations/{id}")).await {
            Ok(op) => {
                errors = 0;
                op
            }
            // The controller may be restarting; the operation resumes with it.
            Err(e) if errors < 150 => {
                if errors == 0 && !client.json {
                    println!("  (controller unreachable, still watching: {e:#})");
                }
                errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !client.json {
            for step in &op.steps {
                let key = (step.zone.clone(), step.step.as_str().to_string());
                let seen = (step.state, step.attempts);
                if shown.get(&key) != Some(&seen) {
                    print_step(step, step.state != StepState::Running);
                    shown.insert(key, seen);
                }
            }
        }
        if op.state != OpState::Running {
            let took = duration(op.created_ms, op.ended_ms.unwrap_or(op.updated_ms));
            let message = op.message.clone().unwrap_or_default();
            if client.json {
                println!("{}", serde_json::to_string_pretty(&op)?);
            }
            return match op.state {
                OpState::Succeeded => {
                    if !client.json {
                        println!("operation {id} succeeded in {took}: {}", what(&op.plan));
                        if !message.is_empty() {
                            println!("  note: {message}");
                        }
                    }
                    Ok(())
                }
                state => anyhow::bail!("operation {id} {} after {took}: {message}", state.as_str()),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    paddock_controller::now_ms()
}

fn duration(from_ms: i64, to_ms: i64) -> String {
    let ms = (to_ms - from_ms).max(0);
    if ms < 10_000 {
        format!("{:.2} s", ms as f64 / 1000.0)
    } else {
        format!("{:.0} s", ms as f64 / 1000.0)
    }
}
