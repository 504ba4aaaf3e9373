//! `paddock balancer`: the wiring around `paddock_balancer::run`: its sockets (inherited
//! across a restart in place), its signals, and the platform builds the controller names, which
//! it installs ([`Builds`]) and restarts on in place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::builds::Builds;
use crate::{BalancerArgs, PinThreads, handoff, host_name};
use anyhow::Context as _;

pub fn balancer(args: BalancerArgs) -> anyhow::Result<()> {
    // Held until the handlers listen (`balancer_signals`): a SIGHUP or SIGUSR2 sent while the
    // balancer starts waits instead of meeting the default action, which ends the process.
    handoff_signals(libc::SIG_BLOCK);
    let name = match args.name {
        Some(name) => name,
        None => format!("lb-{}", host_name()),
    };
    if !paddock_core::manifest::is_valid_name(&name) {
        anyhow::bail!(
            "balancer name {name:?} is not valid: give --name with 1 to 63 of a-z, 0-9 and '-'"
        );
    }
    let source = match (args.controller, args.table) {
        (Some(url), None) => paddock_balancer::Source::Controller(
            paddock_balancer::feed::ControllerLink {
                controller: std::sync::Arc::new(
                    paddock_api::Controllers::parse(&url)
                        .map_err(|e| anyhow::anyhow!("--controller: {e}"))?,
                ),
                join_token: args.join_token.context(
                    "--controller needs --join-token (or PADDOCK_JOIN_TOKEN): the controller's <data>/join.token",
                )?,
                // Set below, once the runtime its tasks run on exists.
                platform: None,
            },
        ),
        (None, Some(path)) => paddock_balancer::Source::File(path),
        _ => anyhow::bail!(
            "nothing to route by: give --controller URL (a farm) or --table FILE (a fixed routing table)"
        ),
    };
    let threads = match args.threads {
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.rise == 0 || args.fall == 0 {
        anyhow::bail!("--rise and --fall count checks: give 1 or more");
    }
    if args.max_header_bytes < 1024 {
        anyhow::bail!(
            "--max-header-bytes {} is too small: give 1024 or more",
            args.max_header_bytes
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(paddock_balancer::tls::Certificates::load(
            cert,
            key,
            !args.no_http2,
        )?)),
        _ => None,
    };
    let access_log = match &args.access_log {
        None => None,
        Some(path) => {
            let destination = if path.as_os_str() == "-" {
                paddock_balancer::access_log::Destination::Stdout
            } else {
                paddock_balancer::access_log::Destination::File(path.clone())
            };
            Some(
                paddock_balancer::access_log::AccessLog::open(destination, threads)
                    .context("--access-log")?,
            )
        }
    };
    let mut config = paddock_balancer::BalancerConfig {
        data_dir: args
            .data
            .unwrap_or_else(|| PathBuf::from(".paddock").join(&name)),
        name,
        listen: args.listen,
        admin: Some(args.admin),
        source,
        health: paddock_balancer::upstream::HealthConfig {
            interval: args.check_interval,
            timeout: args.check_timeout,
            rise: args.rise,
            fall: args.fall,
        },
        pool: paddock_balancer::upstream::PoolConfig {
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            max_idle: 256,
            workers: threads,
        },
        proxy: paddock_balancer::proxy::ProxyConfig {
            response_timeout: args.response_timeout,
        },
        header_timeout: args.header_timeout,
        send_timeout: args.send_timeout,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        threads,
        pin_threads: match args.pin_threads {
            PinThreads::Auto => paddock_balancer::Pinning::Auto,
            PinThreads::On => paddock_balancer::Pinning::On,
            PinThreads::Off => paddock_balancer::Pinning::Off,
        },
        tls: tls.clone(),
        redirect_http: args.redirect_http,
        access_log: access_log.clone(),
    };
    // Its file now, before anything may be installed over it: what a restart starts.
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut sockets = paddock_balancer::Sockets {
        listen: handoff::inherited(args.listen),
        admin: handoff::inherited(args.admin),
        redirect: args.redirect_http.and_then(handoff::inherited),
    };
    handoff::close_unclaimed();
    // A single-threaded runtime: the balancer runs one event loop per thread itself. The name
    // is for its blocking-pool threads, apart from the loops' `paddock-balancer-N`.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("balancer-block")
        .build()
        .context("starting the async runtime")?;
    let (stop, mut stops) = tokio::sync::mpsc::channel(4);
    // The certificate files a restart reads again, checked before it stops anything.
    let tls_files = args.tls_cert.clone().zip(args.tls_key.clone());
    {
        let _entered = runtime.enter();
        reload_signal(tls, access_log.clone())?;
        balancer_signals(exe.clone(), tls_files.clone(), stop.clone())?;
    }
    // The build a platform upgrade installed over `exe`: the next process is started on it.
    let installed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    // What installs builds, told when a restart on one fails.
    let mut upgrades: Option<Arc<Builds>> = None;
    if let paddock_balancer::Source::Controller(link) = &mut config.source {
        let installed = installed.clone();
        let _entered = runtime.enter();
        match Builds::new(&link.controller, &link.join_token) {
            Ok((builds, mut restarts)) => {
                let builds = Arc::new(builds);
                upgrades = Some(builds.clone());
                let told = builds.clone();
                // An installed build: recorded for the next process, and a restart in place.
                tokio::spawn(async move {
                    while let Some(build) = restarts.recv().await {
                        // Checked before the drain, which a restart that fails would repeat at
                        // every try; the installer logs and reports why, and tries again later.
                        if let Err(e) = restartable(&build.exe, tls_files.as_ref()) {
                            told.restart_failed(&format!(
                                "{e:#}; the new program would not start. Fix that, then send SIGUSR2 or `paddock op resume`"
                            ));
                            continue;
                        }
                        *installed.lock().unwrap_or_else(|e| e.into_inner()) = Some(build.build);
                        if stop.send(paddock_balancer::Stop::Restart).await.is_err() {
                            return;
                        }
                    }
                });
                link.platform = Some(builds);
            }
            // Without its own executable's path a balancer cannot be upgraded, but it routes.
            Err(e) => tracing::warn!("platform upgrades off for this balancer: {e:#}"),
        }
    }
    loop {
        let restart =
            runtime.block_on(paddock_balancer::run(config.clone(), sockets, &mut stops))?;
        let Some(kept) = restart else {
            runtime.shutdown_timeout(Duration::from_secs(1));
            // Every request has ended: its line is written before the process ends.
            flush(access_log.as_ref());
            return Ok(());
        };
        // Every request has ended: its line is written before the process is replaced.
        flush(access_log.as_ref());
        let listeners: Vec<&std::net::TcpListener> = kept
            .listen
            .iter()
            .chain(kept.admin.iter())
            .chain(kept.redirect.iter())
            .collect();
        // The same process (PID, arguments, listening sockets) on what is at its path now.
        // SIGUSR2 and SIGHUP stay blocked across `exec`, until the new program listens for them.
        handoff_signals(libc::SIG_BLOCK);
        let build = installed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let failed = handoff::exec(&exe, build.as_deref(), &listeners);
        handoff_signals(libc::SIG_UNBLOCK);
        tracing::error!("{failed:#}; serving on as before, on the same sockets");
        if build.is_some()
            && let Some(builds) = &upgrades
        {
            builds.restart_failed(&format!("{failed:#}"));
        }
        sockets = kept;
    }
}

/// Installs the balancer's signal handlers (before anything else, so that no signal finds the
/// default action, which ends the process): SIGTERM and Ctrl-C stop it; SIGUSR2 restarts it
/// in the same process on the executable file `exe` it was started from (after a new one was
/// installed there), keeping the listening sockets, if that file is a program and the
/// certificate and key of `tls` (read again by the new program) still make a TLS config.
fn balancer_signals(
    exe: PathBuf,
    tls: Option<(PathBuf, PathBuf)>,
    tx: tokio::sync::mpsc::Sender<paddock_balancer::Stop>,
) -> anyhow::Result<()> {
    use paddock_balancer::Stop;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut restart = signal(SignalKind::user_defined2()).context("listening for SIGUSR2")?;
    // Blocked at the start, and by a restart, so that one sent meanwhile waits for this moment.
    handoff_signals(libc::SIG_UNBLOCK);
    tokio::spawn(async move {
        loop {
            let stop = tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received");
                    Stop::Exit
                }
                _ = interrupt.recv() => {
                    tracing::info!("interrupt received");
                    Stop::Exit
                }
                _ = restart.recv() => match restartable(&exe, tls.as_ref()) {
                    Ok(()) => {
                        tracing::info!(exe = %exe.display(), "SIGUSR2 received: restarting on the executable installed at this path");
                        Stop::Restart
                    }
                    Err(e) => {
                        tracing::error!("SIGUSR2 received, not restarting: {e:#}; the new program would not start. Fix that (a new `paddock` is installed at the executable's path by rename), then send SIGUSR2 again");
                        continue;
                    }
                }
            };
            if tx.send(stop).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// SIGHUP: the TLS certificate and key are read again (a renewed certificate, taken by the
/// next handshakes; a pair that does not load is refused and the one in use kept) and the
/// access log is opened again by its path (after log rotation renamed it).
fn reload_signal(
    tls: Option<Arc<paddock_balancer::tls::Certificates>>,
    access_log: Option<paddock_balancer::access_log::AccessLog>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: reading the TLS files and opening the access log again"
            );
            if let Some(tls) = tls.clone() {
                // Reading and parsing files: off the event loop this task shares.
                let reloaded = tokio::task::spawn_blocking(move || (tls.reload(), tls)).await;
                let Ok((reloaded, tls)) = reloaded else {
                    continue;
                };
                let (cert, key) = tls.files();
                match reloaded {
                    Ok(()) => tracing::info!(
                        cert = %cert.display(),
                        key = %key.display(),
                        "TLS certificate reloaded: new connections get it"
                    ),
                    Err(e) => tracing::error!(
                        "TLS certificate not reloaded: {e}; new connections get the certificate in use, as before. Fix the files, then send SIGHUP again"
                    ),
                }
            }
            if let Some(access_log) = access_log.clone() {
                // It waits for the writer, which may wait for the disk.
                let _ = tokio::task::spawn_blocking(move || access_log.reopen()).await;
            }
        }
    });
    Ok(())
}

/// Writes what the access log holds, saying so when its writer is stuck.
fn flush(access_log: Option<&paddock_balancer::access_log::AccessLog>) {
    if let Some(Err(e)) = access_log.map(|log| log.flush()) {
        tracing::error!("{e:#}");
    }
}

/// Whether a restart in place on `exe` would start: the file is a program, and the certificate
/// and key of `tls` (which the new program reads again) still make a TLS config.
fn restartable(exe: &std::path::Path, tls: Option<&(PathBuf, PathBuf)>) -> anyhow::Result<()> {
    runnable(exe)?;
    if let Some((cert, key)) = tls {
        paddock_balancer::tls::server_config(cert, key, true)?;
    }
    Ok(())
}

/// Whether `exe` is a file this process could run: executable, and a program (ELF), not a
/// file the system would hand to a shell.
fn runnable(exe: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(exe).with_context(|| format!("{}", exe.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        anyhow::bail!("{} is not an executable file", exe.display());
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(exe)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("reading {}", exe.display()))?;
    if &magic != b"\x7fELF" {
        anyhow::bail!("{} is not a program (no ELF header)", exe.display());
    }
    Ok(())
}

/// Blocks or unblocks SIGUSR2 and SIGHUP for this thread (`how`: `SIG_BLOCK`, `SIG_UNBLOCK`); the mask
/// is kept across `exec`, and threads started later inherit it.
fn handoff_signals(how: libc::c_int) {
    // SAFETY: a signal set built here and passed by pointer to calls that only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}
