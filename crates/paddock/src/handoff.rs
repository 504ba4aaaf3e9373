//! Restarting on a new platform build without closing the listening sockets.
//!
//! A front-end or controller that installed a build, or a balancer told to restart, replaces
//! its process with the new executable ([`exec`]): same PID, same arguments, and the same
//! listening sockets, handed over by number in [`LISTEN_FD_ENV`] (comma-separated) with
//! close-on-exec cleared on them alone. Connections that arrive meanwhile wait in a socket's
//! backlog until the new process accepts them, and the port stays the same even when it was
//! chosen by the system (`--listen 127.0.0.1:0`). The new process takes each socket back with
//! [`listener`] or [`inherited`], by the address it is bound to, instead of binding again, and
//! closes what it did not take with [`close_unclaimed`].

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;

/// The numbers of the listening sockets a restarting process hands over, comma-separated.
pub const LISTEN_FD_ENV: &str = "PADDOCK_LISTEN_FD";
/// The process it is handed to (the same one: `exec` keeps the PID), so that a child which
/// inherited the environment does not take a number that means something else there.
pub const LISTEN_PID_ENV: &str = "PADDOCK_LISTEN_PID";
use paddock_api::BUILD_ENV;

/// Connections waiting to be accepted, beyond which the kernel refuses new ones.
const BACKLOG: i32 = 1024;

/// The handed-over sockets not taken yet, read from the environment once.
static HANDED: OnceLock<Mutex<Vec<i32>>> = OnceLock::new();

fn handed() -> &'static Mutex<Vec<i32>> {
    HANDED.get_or_init(|| {
        let ours = std::env::var(LISTEN_PID_ENV)
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            == Some(std::process::id());
        let fds = match std::env::var(LISTEN_FD_ENV) {
            Ok(fds) if ours => fds
                .split(',')
                .filter_map(|fd| fd.trim().parse::<i32>().ok())
                .filter(|&fd| fd >= 3)
                .collect(),
            _ => Vec::new(),
        };
        let mut open: Vec<i32> = Vec::new();
        for fd in fds {
            // SAFETY: borrowed for one check; a closed number only fails it.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            // Only open descriptors, each once: a number that is not open now may be given to
            // a socket this process makes, which must not be taken for a handed-over one.
            if rustix::io::fcntl_getfd(borrowed).is_ok() && !open.contains(&fd) {
                open.push(fd);
            }
        }
        Mutex::new(open)
    })
}

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

/// The handed-over socket bound where `wanted` says (any port when `wanted` has port 0), if
/// there is one; each is taken once.
pub fn inherited(wanted: SocketAddr) -> Option<TcpListener> {
    let mut handed = handed().lock().unwrap_or_else(|e| e.into_inner());
    let at = handed.iter().position(|&fd| fits(fd, wanted))?;
    let fd = handed.remove(at);
    // SAFETY: this process's previous program named this descriptor for it (same PID) and
    // kept it open across `exec`; it leaves the list as it is owned, so it is owned once.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    // Not inherited again by anything this process starts.
    let _ = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC);
    tracing::info!(address = ?listener.local_addr().ok(), "listening on the socket the previous process handed over");
    Some(listener)
}

/// Whether descriptor `fd` is a listening TCP socket bound where `wanted` says.
fn fits(fd: i32, wanted: SocketAddr) -> bool {
    // SAFETY: borrowed for the checks only; the descriptor stays open and unowned.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
    bound.is_some_and(|bound| {
        bound.ip() == wanted.ip() && (wanted.port() == 0 || bound.port() == wanted.port())
    }) && socket.r#type().ok() == Some(socket2::Type::STREAM)
        && rustix::net::sockopt::socket_acceptconn(borrowed).unwrap_or(false)
}

/// Closes the handed-over sockets this process did not take: connections to them are refused,
/// not left waiting for nobody.
pub fn close_unclaimed() {
    let mut handed = handed().lock().unwrap_or_else(|e| e.into_inner());
    for fd in handed.drain(..) {
        tracing::warn!(
            fd,
            "not listening on a handed-over socket: it is not a listening socket at an address this process listens on"
        );
        // SAFETY: handed over to this process and not taken: owned here, closed once.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    }
}

/// Replaces this process with `exe`, same arguments, handing over `listeners` (in this order:
/// [`inherited`] gives each address the first that fits); `build` names the platform build it
/// is, when known. Returns only when that failed.
pub fn exec(exe: &Path, build: Option<&str>, listeners: &[&TcpListener]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    for listener in listeners {
        if let Err(e) = rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()) {
            return anyhow::Error::from(std::io::Error::from(e))
                .context("keeping the listening socket open for the new build");
        }
    }
    let fds: Vec<String> = listeners
        .iter()
        .map(|l| l.as_raw_fd().to_string())
        .collect();
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FD_ENV, fds.join(","))
        .env(LISTEN_PID_ENV, std::process::id().to_string());
    match build {
        Some(build) => command.env(BUILD_ENV, build),
        None => command.env_remove(BUILD_ENV),
    };
    let error = command.exec();
    // Still this program: the sockets are its own again.
    for listener in listeners {
        let _ = rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::CLOEXEC);
    }
    anyhow::Error::from(error).context(format!("starting {}", exe.display()))
}
