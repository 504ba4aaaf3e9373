//! `paddock`: one binary for every Paddock process and command. Parsing and wiring only; the work
//! is done by the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use paddock_controller::ControllerConfig;
use paddock_frontend::FrontendConfig;
use paddock_frontend::deployer::ControllerLink;

mod cmd {
    pub mod admin;
    pub mod cache;
    pub mod config;
    pub mod data;
    pub mod ops;
    pub mod timer;
    pub mod up;
}
mod balancer;
mod builds;
mod handoff;
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
    /// Run a whole farm on this machine: a controller, front-ends and a balancer, stopped
    /// together.
    Up(cmd::up::UpArgs),
    /// Run the controller: desired state, publishing, admin API.
    Controller(ControllerArgs),
    /// Run a front-end server: serve apps, hot-swap their versions.
    Frontend(FrontendArgs),
    /// Run a load balancer: route requests to the front-ends, as the controller's table says.
    Balancer(BalancerArgs),
    /// Upload, publish, list and roll back apps.
    App {
        #[command(subcommand)]
        command: cmd::admin::AppCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// Deploy app versions: in place (hot swap on every front-end), or `--balanced` (without
    /// downtime: half the servers out of traffic, updated, smoke-tested, then one cutover).
    Deploy {
        #[command(flatten)]
        args: cmd::ops::DeployArgs,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// Balanced platform upgrade: install a `paddock` executable on every front-end without
    /// downtime (half of each zone out of traffic, upgraded and smoke-tested, one cutover,
    /// then the other half).
    Upgrade {
        #[command(flatten)]
        args: cmd::ops::UpgradeArgs,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The platform builds the controller keeps for upgrades.
    Platform {
        #[command(subcommand)]
        command: cmd::ops::PlatformCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The journaled operations (balanced deployments and platform upgrades): list, show,
    /// watch, abort, resume.
    Op {
        #[command(subcommand)]
        command: cmd::ops::OpCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// An app's config: show it, override a value at run time, remove an override.
    Config {
        #[command(subcommand)]
        command: cmd::config::ConfigCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The front-ends' response caches: purge an app's cached responses farm-wide, see them.
    Cache {
        #[command(subcommand)]
        command: cmd::cache::CacheCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The apps' data: what they keep, a bucket's keys, a value; end an app's sessions.
    Data {
        #[command(subcommand)]
        command: cmd::data::DataCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// App timers: list them, their runs, run one now.
    Timer {
        #[command(subcommand)]
        command: cmd::timer::TimerCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The servers of the farm: role, address, health, services, loaded versions.
    Servers {
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// Switch a server's services, its routing (ready, drain, maint), or remove it.
    Server {
        name: String,
        #[command(subcommand)]
        command: cmd::admin::ServerCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// Set a zone's balancing policy.
    Zone {
        name: String,
        #[command(subcommand)]
        command: cmd::admin::ZoneCommand,
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The routing: each balancer and the generation it routes by, each front-end's state.
    Routing {
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The standby controllers reporting to the controller (`--standby --follow`): where each
    /// runs, and its build.
    Standbys {
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// The farm's health: one line per server, and what is out of date where.
    Status {
        #[command(flatten)]
        target: cmd::admin::Target,
    },
    /// Check an app package (paddock.toml and its component) without deploying it.
    Check {
        /// The package folder (holding paddock.toml).
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Address of the admin API and the control channel.
    #[arg(long, default_value = "127.0.0.1:7070", env = "PADDOCK_LISTEN")]
    listen: SocketAddr,
    /// The platform database: sqlite://PATH (one machine) or postgres://USER@HOST:PORT/DB.
    #[arg(
        long,
        env = "PADDOCK_DB",
        default_value = "sqlite://.paddock/paddock.db"
    )]
    db: String,
    /// Where the tokens are kept.
    #[arg(
        long,
        value_name = "DIR",
        env = "PADDOCK_DATA",
        default_value = ".paddock/controller"
    )]
    data: PathBuf,
    /// Largest package upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    max_upload_mib: usize,
    /// When an active front-end in rotation sends no heartbeat for this long (a crash; one
    /// stopped on purpose says so), activate a ready passive front-end of its zone instead.
    /// 0s: never; otherwise at least 6s (a server counts as down after 5 s).
    #[arg(long, default_value = "30s", value_parser = failover_after)]
    failover_after: Duration,
    /// Stand by while another controller holds the database (rather than exit), and take over
    /// when it stops or dies: same --db, a copy of its --data (the tokens), and an address the
    /// front-ends and balancers reach (the same one behind a DNS name or virtual IP).
    #[arg(long)]
    standby: bool,
    /// A standby: the farm's controller (several, comma-separated: the active one and its
    /// standbys, as front-ends are given them). It reports to the one holding the role while it
    /// stands by, and installs the platform builds that one names, so that it takes over on the
    /// farm's release.
    #[arg(long, value_name = "URL", requires = "standby")]
    follow: Option<String>,
    /// This standby's name in its reports (default: ctl-<host name>).
    #[arg(long, requires = "follow")]
    name: Option<String>,
    /// Take platform builds and run platform upgrades (`paddock upgrade`): the `paddock`
    /// executables uploaded with the admin token are installed and run on every server.
    #[arg(long, env = "PADDOCK_PLATFORM_UPGRADES")]
    platform_upgrades: bool,
}

#[derive(clap::Args)]
struct FrontendArgs {
    /// Follow this controller's desired state (deployment service). Several URLs, separated by
    /// commas: the active controller and its standbys, each tried when the one before cannot
    /// be reached.
    #[arg(long, env = "PADDOCK_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// The deployment zone this server belongs to.
    #[arg(long, default_value = "default", env = "PADDOCK_ZONE")]
    zone: String,
    /// The controller's join token (its <data>/join.token).
    #[arg(long, env = "PADDOCK_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The address balancers reach this server at (default: the address it listens on; give
    /// it when listening on 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// Address to serve apps and /_paddock/health on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "PADDOCK_LISTEN")]
    listen: SocketAddr,
    /// This server's name in the farm (default: the host name).
    #[arg(long, env = "PADDOCK_NAME")]
    name: Option<String>,
    /// Deploy every app package found in this folder, and redeploy each one when it changes.
    #[arg(long, value_name = "DIR")]
    apps: Option<PathBuf>,
    /// The farm's database (the controller's --db), where apps keep their data through
    /// wasi:keyvalue and their users' sessions. Without it, opening a bucket fails.
    #[arg(long, env = "PADDOCK_DB", value_name = "URL")]
    db: Option<String>,
    /// Mark session cookies `Secure`: users reach the farm over HTTPS (TLS ends in front of the
    /// balancers), so browsers send the cookie over HTTPS only.
    #[arg(long)]
    secure_cookies: bool,
    /// Where the front-end keeps its compiled artifacts (default: .paddock/<name>).
    #[arg(long, value_name = "DIR", env = "PADDOCK_DATA")]
    data: Option<PathBuf>,
    /// How often the apps folder is looked at.
    #[arg(long, default_value = "500ms", value_parser = positive_duration)]
    scan_interval: Duration,
    /// After SIGTERM or Ctrl-C, keep serving this long while health answers 503, so that an
    /// external load balancer takes the server out before it stops accepting connections.
    #[arg(long, default_value = "0s", value_parser = duration)]
    drain_delay: Duration,
    /// How long requests in flight may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value = "30s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// App instances alive at once (= concurrent requests); more get 503 until one ends.
    #[arg(long, default_value_t = RuntimeConfig::default().max_instances,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_instances: u32,
    /// The most the response cache keeps (responses apps mark cacheable), in MiB; 0 keeps
    /// none. A front-end of a farm keeps them only with --db, where purges come from.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    cache_mib: usize,
    /// How often the farm's purge log is read: the most a purge takes to reach this server.
    #[arg(long, default_value = "200ms", value_parser = purge_poll)]
    purge_poll: Duration,
}

#[derive(clap::Args)]
struct BalancerArgs {
    /// Follow this controller's routing table. Several URLs, separated by commas: the active
    /// controller and its standbys, each tried when the one before cannot be reached.
    #[arg(long, env = "PADDOCK_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// The controller's join token (its <data>/join.token).
    #[arg(long, env = "PADDOCK_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Route by this fixed table instead (the JSON of `GET /control/v1/routing`).
    #[arg(long, value_name = "FILE", conflicts_with = "controller")]
    table: Option<PathBuf>,
    /// Address to take client traffic on.
    #[arg(long, default_value = "127.0.0.1:8000", env = "PADDOCK_LISTEN")]
    listen: SocketAddr,
    /// Serve HTTPS on --listen with this certificate: a PEM file, the server's certificate
    /// first, then its chain. Read at start, and again on SIGHUP (a renewed certificate).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key, a PEM file (unencrypted).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With HTTPS: offer HTTP/1.1 only. By default clients may choose HTTP/2 in the TLS
    /// handshake (front-ends get HTTP/1.1 either way).
    #[arg(long, requires = "tls_cert")]
    no_http2: bool,
    /// With HTTPS: answer plain HTTP at this address (e.g. 0.0.0.0:80) with a redirect to the
    /// same host and path over HTTPS.
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    redirect_http: Option<SocketAddr>,
    /// Address of the admin port (/metrics, /status).
    #[arg(long, default_value = "127.0.0.1:9180")]
    admin: SocketAddr,
    /// Log each request answered on --listen to this file, one JSON line each (`-`: standard
    /// output). Reopened on SIGHUP, after log rotation renamed it.
    #[arg(long, value_name = "FILE")]
    access_log: Option<PathBuf>,
    /// This balancer's name in the farm (default: lb-<host name>).
    #[arg(long, env = "PADDOCK_NAME")]
    name: Option<String>,
    /// Where the last routing table is kept (default: .paddock/<name>).
    #[arg(long, value_name = "DIR", env = "PADDOCK_DATA")]
    data: Option<PathBuf>,
    /// Event loops serving clients, one thread each (default: one per core).
    #[arg(long, value_parser = at_least_one)]
    threads: Option<usize>,
    /// Binding of event loops to CPUs: `auto` binds loop i to the i-th CPU the process may use
    /// when there is one loop per such CPU (the default layout), so that the scheduler never
    /// stacks two loops on one core; `on` always binds; `off` lets the scheduler place them.
    #[arg(long, value_enum, default_value_t = PinThreads::Auto)]
    pin_threads: PinThreads,
    /// Health check interval.
    #[arg(long, default_value = "500ms", value_parser = positive_duration)]
    check_interval: Duration,
    /// A health check not answered within this long fails.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    check_timeout: Duration,
    /// Consecutive passing checks that bring a down front-end back.
    #[arg(long, default_value_t = 2)]
    rise: u32,
    /// Consecutive failing checks that take a front-end out.
    #[arg(long, default_value_t = 2)]
    fall: u32,
    /// Time allowed to connect to a front-end.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    connect_timeout: Duration,
    /// Idle keep-alive connections to front-ends are closed after this long (keep it under the
    /// front-ends' 30 s).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    idle_timeout: Duration,
    /// Time a front-end has to start its response.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    response_timeout: Duration,
    /// Time a client has to send a request's headers; slower clients are cut off.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    header_timeout: Duration,
    /// Longest a client may take none of its response's bytes before it is cut off.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    send_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// Most headers in one request; more gets 431.
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    max_headers: usize,
}

/// The longest a duration flag may be: more is surely a typo (and would overflow the clock).
const LONGEST_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration flag (`500ms`, `10s`, `2m`), at most a week.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 2m)"))?;
    if duration > LONGEST_DURATION {
        return Err(format!(
            "{text} is longer than the {} days a duration may be",
            LONGEST_DURATION.as_secs() / (24 * 3600)
        ));
    }
    Ok(duration)
}

/// `--failover-after`: 0 (never) or longer than the 5 s after which a server counts as down, so
/// that a heartbeat a little late never fails over a live server.
fn failover_after(text: &str) -> Result<Duration, String> {
    let duration = duration(text)?;
    if !duration.is_zero() && duration < Duration::from_secs(6) {
        return Err(
            "must be 0s (never) or at least 6s: a server counts as down after 5 s without a heartbeat".into(),
        );
    }
    Ok(duration)
}

/// `--purge-poll`: more than zero and at most 2 s, well within the 5 s after which a front-end
/// that has not read the purge log stops serving from its cache.
fn purge_poll(text: &str) -> Result<Duration, String> {
    let duration = positive_duration(text)?;
    if duration > Duration::from_secs(2) {
        return Err(
            "must be at most 2s: a front-end that has not read the purge log for 5 s serves nothing from its cache".into(),
        );
    }
    Ok(duration)
}

/// A duration flag that must be more than zero: an interval or a time limit.
pub(crate) fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = duration(text)?;
    if duration.is_zero() {
        return Err("must be more than zero (write e.g. 500ms, 10s, 2m)".into());
    }
    Ok(duration)
}

/// A count that must be 1 or more (threads, headers).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be 1 or more".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e} (give a whole number, 1 or more)")),
    }
}

/// `--pin-threads`: see `paddock_balancer::Pinning`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PinThreads {
    Auto,
    On,
    Off,
}

/// Raises this process's limit of open files to the most it may have (what HAProxy and Go's
/// runtime do): each client of a balancer holds two descriptors (its connection and one to a
/// front-end), and the usual soft limit of 1024 would refuse the 500th client. Processes it
/// starts (`paddock up`'s, a restart in place) inherit it.
///
/// `holds` says what one connection costs the process, for the warning when the limit is low;
/// `None` for `paddock up`, whose processes each say it for themselves.
fn raise_open_files_limit(holds: Option<&str>) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(most)) = (limit.current, limit.maximum) else {
        return; // Unlimited already.
    };
    if current < most {
        let raised = rustix::process::Rlimit {
            current: Some(most),
            maximum: Some(most),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!("open files limit raised from {current} to {most}"),
            Err(e) => tracing::warn!("cannot raise the open files limit from {current}: {e}"),
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if let Some(holds) = holds.filter(|_| now < MIN_OPEN_FILES) {
        tracing::warn!(
            "this process may open {now} files at most ({holds}); raise the hard limit: LimitNOFILE=65536 in its systemd unit, or `nofile` in /etc/security/limits.conf"
        );
    }
}

/// Fewer open files than this are worth a warning.
const MIN_OPEN_FILES: u64 = 4096;

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
    match cli.command {
        Command::Up(_) => raise_open_files_limit(None),
        Command::Controller(_) => raise_open_files_limit(Some(
            "a controller holds one per connection: the CLI's, the servers' reports, the database's",
        )),
        Command::Frontend(_) => raise_open_files_limit(Some(
            "a front-end holds one per client connection, the balancers' pooled ones included",
        )),
        Command::Balancer(_) => raise_open_files_limit(Some(
            "a balancer holds two per client: its connection and one to a front-end",
        )),
        _ => {}
    }
    let result = match cli.command {
        Command::Up(args) => cmd::up::up(args),
        Command::Controller(args) => controller(args),
        Command::Frontend(args) => frontend(args),
        Command::Balancer(args) => balancer::balancer(args),
        Command::Check { path } => check(&path),
        Command::App { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::app(&client, command).await })
        }),
        Command::Deploy { args, target } => admin(&target, |client| {
            Box::pin(async move { cmd::ops::deploy(&client, args).await })
        }),
        Command::Upgrade { args, target } => admin(&target, |client| {
            Box::pin(async move { cmd::ops::upgrade(&client, args).await })
        }),
        Command::Platform { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::ops::platform(&client, command).await })
        }),
        Command::Op { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::ops::op(&client, command).await })
        }),
        Command::Config { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::config::config(&client, command).await })
        }),
        Command::Cache { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::cache::cache(&client, command).await })
        }),
        Command::Data { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::data::data(&client, command).await })
        }),
        Command::Timer { command, target } => admin(&target, |client| {
            Box::pin(async move { cmd::timer::timer(&client, command).await })
        }),
        Command::Servers { target } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::servers(&client).await })
        }),
        Command::Server {
            name,
            command,
            target,
        } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::server(&client, &name, command).await })
        }),
        Command::Zone {
            name,
            command,
            target,
        } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::zone(&client, &name, command).await })
        }),
        Command::Routing { target } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::routing(&client).await })
        }),
        Command::Standbys { target } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::standbys(&client).await })
        }),
        Command::Status { target } => admin(&target, |client| {
            Box::pin(async move { cmd::admin::status(&client).await })
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;

fn admin(
    target: &cmd::admin::Target,
    command: impl FnOnce(cmd::admin::Client) -> BoxFuture,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = cmd::admin::Client::connect(target).await?;
            command(client).await
        })
}

fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let mut config = ControllerConfig {
        listen: args.listen,
        db_url: args.db,
        data_dir: args.data,
        max_upload_bytes: args
            .max_upload_mib
            .checked_mul(1024 * 1024)
            .filter(|&bytes| bytes > 0)
            .context("--max-upload-mib: give a size in MiB, at least 1")?,
        failover_after: (!args.failover_after.is_zero()).then_some(args.failover_after),
        standby: args.standby,
        // Only a socket handed over by a restart: a controller binds once it holds the role,
        // so that a second one started by mistake is told who runs instead of a port conflict.
        listener: std::sync::Arc::new(std::sync::Mutex::new({
            let inherited = handoff::inherited(args.listen);
            handoff::close_unclaimed();
            inherited
        })),
        platform_upgrades: args.platform_upgrades,
        follow: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("paddock-controller")
        .build()
        .context("starting the async runtime")?;
    if let Some(urls) = args.follow {
        let name = args.name.unwrap_or_else(|| format!("ctl-{}", host_name()));
        if !paddock_core::manifest::is_valid_name(&name) {
            anyhow::bail!(
                "standby name {name:?} is not valid: give --name with 1 to 63 of a-z, 0-9 and '-'"
            );
        }
        let controllers = std::sync::Arc::new(
            paddock_api::Controllers::parse(&urls).map_err(|e| anyhow::anyhow!("--follow: {e}"))?,
        );
        // The standby's copy of the active controller's tokens.
        let join_token = paddock_controller::tokens::Tokens::load_or_create(&config.data_dir)?.join;
        match builds::Builds::standby(&controllers, &join_token) {
            Ok(builds) => {
                config.follow = Some(paddock_controller::standby::Follow {
                    controllers,
                    name,
                    join_token,
                    platform: std::sync::Arc::new(builds),
                });
            }
            Err(e) => tracing::warn!("platform builds not followed by this standby: {e:#}"),
        }
    }
    let exit = runtime.block_on(paddock_controller::run(config, shutdown_signal()))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    match exit {
        paddock_controller::Exit::Stopped => Ok(()),
        paddock_controller::Exit::Restart {
            exe,
            build,
            listener,
        } => {
            let listeners: Vec<&std::net::TcpListener> = listener.iter().collect();
            Err(handoff::exec(&exe, Some(&build), &listeners))
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
    if args.controller.is_some() {
        for (flag, value) in [("--name", &name), ("--zone", &args.zone)] {
            if !paddock_core::manifest::is_valid_name(value) {
                anyhow::bail!("{flag} {value:?} is not valid: use 1 to 63 of a-z, 0-9 and '-'");
            }
        }
    }
    let controller = match args.controller {
        Some(url) => Some(ControllerLink {
            controller: std::sync::Arc::new(paddock_api::Controllers::parse(&url).map_err(|e| anyhow::anyhow!("--controller: {e}"))?),
            join_token: args.join_token.context(
                "--controller needs --join-token (or PADDOCK_JOIN_TOKEN): the controller's <data>/join.token",
            )?,
            zone: args.zone,
            advertise: args.advertise,
        }),
        None => None,
    };
    if controller.is_some() && args.apps.is_some() {
        anyhow::bail!(
            "--apps and --controller both decide which apps run; give one: --controller for a farm, --apps for a folder"
        );
    }
    if controller.is_none() && args.apps.is_none() {
        anyhow::bail!(
            "nothing to serve: give --apps DIR (a folder of app packages) or --controller URL"
        );
    }
    let listener = handoff::listener(args.listen)?;
    handoff::close_unclaimed();
    let config = FrontendConfig {
        name,
        listen: args.listen,
        listener: std::sync::Arc::new(std::sync::Mutex::new(Some(listener))),
        apps_dir: args.apps,
        controller,
        data_dir,
        db: args.db,
        secure_cookies: args.secure_cookies,
        scan_interval: args.scan_interval,
        cache_bytes: args.cache_mib.saturating_mul(1024 * 1024),
        purge_poll: args.purge_poll,
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
    let exit = runtime.block_on(paddock_frontend::run(config, shutdown_signal()))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    match exit {
        paddock_frontend::Exit::Stopped => Ok(()),
        // The same process (PID, arguments, listening socket) on the new build: whatever
        // supervises it sees no exit.
        paddock_frontend::Exit::Restart {
            exe,
            build,
            listener: Some(listener),
        } => Err(handoff::exec(&exe, Some(&build), &[&listener])),
        paddock_frontend::Exit::Restart { listener: None, .. } => {
            anyhow::bail!(
                "restarting on the installed platform build: the listening socket is gone"
            )
        }
    }
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

/// This machine's host name as a server name: its first label, lowercase, other characters than
/// a-z, 0-9 and '-' made '-' (`Web01.example.com` is `web01`).
fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    server_name_of(&host)
}

fn server_name_of(host: &str) -> String {
    let name: String = host
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if paddock_core::manifest::is_valid_name(&name) {
        name
    } else {
        "frontend".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::server_name_of;

    #[test]
    fn a_host_name_becomes_a_valid_server_name() {
        for (host, name) in [
            ("web01\n", "web01"),
            ("Web01.example.com", "web01"),
            ("build_box-2", "build-box-2"),
            ("-x-", "x"),
            ("", "frontend"),
            ("...", "frontend"),
        ] {
            assert_eq!(server_name_of(host), name, "{host:?}");
        }
        assert_eq!(server_name_of(&"a".repeat(80)).len(), 63);
    }
}
