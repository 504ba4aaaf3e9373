//! `paddock`: one binary for every Paddock process and command. Parsing and wiring only; the work
//! is done by the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use paddock_frontend::FrontendConfig;
use paddock_runtime::{RuntimeConfig, sha256_hex};

#[derive(Parser)]
#[command(
    name = "paddock",
    version,
    about = "Paddock: a self-hosted application server farm for WebAssembly apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a front-end server: serve apps, hot-swap their versions.
    Frontend(FrontendArgs),
    /// Check an app package (paddock.toml and its component) without deploying it.
    Check {
        /// The package folder (holding paddock.toml).
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct FrontendArgs {
    /// Address to serve apps and /_paddock/health on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "PADDOCK_LISTEN")]
    listen: SocketAddr,
    /// This server's name in the farm (default: the host name).
    #[arg(long, env = "PADDOCK_NAME")]
    name: Option<String>,
    /// Deploy every app package found in this folder, and redeploy each one when it changes.
    #[arg(long, value_name = "DIR")]
    apps: Option<PathBuf>,
    /// Where the front-end keeps its compiled artifacts (default: .paddock/<name>).
    #[arg(long, value_name = "DIR", env = "PADDOCK_DATA")]
    data: Option<PathBuf>,
    /// How often the apps folder is looked at.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    scan_interval: Duration,
    /// After SIGTERM or Ctrl-C, keep serving this long while health answers 503, so that an
    /// external load balancer takes the server out before it stops accepting connections.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    drain_delay: Duration,
    /// How long requests in flight may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// App instances alive at once (= concurrent requests); more get 503 until one ends.
    #[arg(long, default_value_t = RuntimeConfig::default().max_instances)]
    max_instances: u32,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Frontend(args) => frontend(args),
        Command::Check { path } => check(&path),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let name = match args.name {
        Some(name) => name,
        None => host_name(),
    };
    let data_dir = args
        .data
        .unwrap_or_else(|| PathBuf::from(".paddock").join(&name));
    if let Some(dir) = &args.apps
        && !dir.is_dir()
    {
        anyhow::bail!(
            "--apps {}: no such folder; create it and put app packages (paddock.toml + component) in it",
            dir.display()
        );
    }
    let config = FrontendConfig {
        name,
        listen: args.listen,
        apps_dir: args.apps,
        data_dir,
        scan_interval: args.scan_interval,
        drain_delay: args.drain_delay,
        shutdown_timeout: args.shutdown_timeout,
        runtime: RuntimeConfig {
            max_instances: args.max_instances,
            ..RuntimeConfig::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("paddock-frontend")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(paddock_frontend::run(config, shutdown_signal()))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (manifest, component) = paddock_frontend::folder::read_package(path)
        .with_context(|| format!("package {}", path.display()))?;
    let runtime = paddock_runtime::Runtime::new(&RuntimeConfig {
        max_instances: 1,
        ..RuntimeConfig::default()
    })?;
    let started = std::time::Instant::now();
    runtime
        .compile(&component)
        .with_context(|| format!("package {}: {}", path.display(), manifest.component))?;
    let sha = sha256_hex(&component);
    println!(
        "{} {} ok: route {}, zone {}, component sha256 {}, compiled in {} ms",
        manifest.name,
        manifest.version_for(&sha),
        manifest.route,
        manifest.zone,
        sha,
        started.elapsed().as_millis()
    );
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "frontend".to_string())
}
