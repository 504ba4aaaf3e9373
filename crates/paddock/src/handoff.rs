//! Restarting on a new platform build without closing the listening socket.
//!
//! A front-end or controller that installed a build replaces its process with the new
//! executable ([`exec`]): same PID, same arguments, and the same listening socket, handed over
//! by number in [`LISTEN_FD_ENV`] with close-on-exec cleared on it alone. Connections that
//! arrive meanwhile wait in the socket's backlog until the new process accepts them, and the
//! port stays the same even when it was chosen by the system (`--listen 127.0.0.1:0`). The new
//! process takes the socket back with [`listener`] instead of binding again.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

/// The number of the listening socket a restarting process hands over.
pub const LISTEN_FD_ENV: &str = "PADDOCK_LISTEN_FD";
/// The process it is handed to (the same one: `exec` keeps the PID), so that a child which
/// inherited the environment does not take a number that means something else there.
pub const LISTEN_PID_ENV: &str = "PADDOCK_LISTEN_PID";
use paddock_api::BUILD_ENV;

/// Connections waiting to be accepted, beyond which the kernel refuses new ones.
const BACKLOG: i32 = 1024;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The socket to listen on: the one the previous process handed over if it listens at
/// `wanted` (any port when `wanted` has port 0), or a new one bound there.
pub fn listener(wanted: SocketAddr) -> anyhow::Result<TcpListener> {
    if let Some(inherited) = inherited(wanted) {
        return Ok(inherited);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(wanted),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&wanted.into())
        .with_context(|| format!("cannot listen on {wanted}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on {wanted}"))?;
    Ok(socket.into())
}

/// The handed-over socket, once per process, if it is a TCP socket bound where `wanted` says.
pub fn inherited(wanted: SocketAddr) -> Option<TcpListener> {
    let fd: i32 = std::env::var(LISTEN_FD_ENV).ok()?.parse().ok()?;
    let pid: u32 = std::env::var(LISTEN_PID_ENV).ok()?.parse().ok()?;
    if fd < 3 || pid != std::process::id() || TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: this process's previous program named this descriptor for it (same PID) and
    // kept it open across `exec`; `TAKEN` lets it be owned once.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    // Not inherited again by anything this process starts.
    let _ = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC);
    let socket = socket2::SockRef::from(&listener);
    let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
    let fits = bound.is_some_and(|bound| {
        bound.ip() == wanted.ip() && (wanted.port() == 0 || bound.port() == wanted.port())
    }) && socket.r#type().ok() == Some(socket2::Type::STREAM)
        && rustix::net::sockopt::socket_acceptconn(&listener).unwrap_or(false);
    if !fits {
        // Closed (dropped) rather than left open: connections to it are refused, not left
        // waiting for nobody.
        tracing::warn!(fd, wanted = %wanted, "not listening on the handed-over socket: it is not a listening socket at that address");
        return None;
    }
    tracing::info!(address = ?bound, "listening on the socket the previous process handed over");
    Some(listener)
}

/// Replaces this process with `exe`, same arguments, handing over `listener`. Returns only
/// when that failed.
pub fn exec(exe: &Path, build: &str, listener: &TcpListener) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    if let Err(e) = rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()) {
        return anyhow::Error::from(std::io::Error::from(e))
            .context("keeping the listening socket open for the new build");
    }
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(BUILD_ENV, build)
        .env(LISTEN_FD_ENV, listener.as_raw_fd().to_string())
        .env(LISTEN_PID_ENV, std::process::id().to_string())
        .exec();
    anyhow::Error::from(error).context(format!(
        "starting the installed platform build {}",
        exe.display()
    ))
}
