//! `paddock up`: the whole farm from one command, publishable at once, stopped by one signal.

mod harness;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Conn, PADDOCK, fixture, new_build, own_paddock};

/// A port nobody listens on now, with the next one free too.
fn free_port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Ports for a farm: controller, first front-end, balancer (each with the next one free too).
fn farm_ports() -> [u16; 3] {
    [(); 3].map(|_| free_port_pair())
}

/// Fails if any of `ports` still takes connections once the farm stopped.
fn assert_not_served(ports: &[u16]) {
    for &port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still served after the farm stopped"
        );
    }
}

/// `paddock up` with its data in `data` and its ports: controller, first front-end, balancer
/// (its admin port is the next one).
fn up_command(
    data: &std::path::Path,
    frontends: u16,
    [controller, frontend, balancer]: [u16; 3],
) -> Command {
    up_command_from(
        std::path::Path::new(PADDOCK),
        data,
        frontends,
        [controller, frontend, balancer],
    )
}

/// The same, running the `paddock` at `exe`.
fn up_command_from(
    exe: &std::path::Path,
    data: &std::path::Path,
    frontends: u16,
    [controller, frontend, balancer]: [u16; 3],
) -> Command {
    let mut up = Command::new(exe);
    up.args(["up", "--frontends", &frontends.to_string()])
        .arg("--data")
        .arg(data)
        .args(["--controller-port", &controller.to_string()])
        .args(["--frontend-port", &frontend.to_string()])
        .args(["--balancer-port", &balancer.to_string()])
        .args(["--balancer-admin-port", &(balancer + 1).to_string()])
        .stdin(Stdio::null());
    up
}

/// Starts `up` with its output collected (and echoed, tagged `[up]`).
fn spawn_up(up: &mut Command) -> (std::process::Child, Arc<Mutex<String>>) {
    let mut up = up
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(up.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(up.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[up] {line}");
                output.lock().unwrap().push_str(&(line + "\n"));
            }
        });
    }
    (up, output)
}

/// `paddock ARGS` against the farm `up` started with its data in `data`, finding the admin
/// token there; its standard output, once it succeeded.
fn farm_cli(controller_port: u16, data: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(PADDOCK)
        .args(args)
        .env(
            "PADDOCK_CONTROLLER",
            format!("http://127.0.0.1:{controller_port}"),
        )
        .env("PADDOCK_DATA", data)
        .env_remove("PADDOCK_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits (at most 60 s) until `output` has `text`.
async fn wait_said(output: &Mutex<String>, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !output.lock().unwrap().contains(text) {
        assert!(
            Instant::now() < deadline,
            "paddock up did not say {text:?}:\n{}",
            output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number `output` gives after the last `before` (a pid).
fn number_after(output: &Mutex<String>, before: &str) -> u32 {
    let output = output.lock().unwrap();
    output
        .rsplit_once(before)
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no number after {before:?} in:\n{output}"))
}

/// Waits (at most 60 s) until `up` has exited; its status.
async fn wait_exited(up: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = up.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "paddock up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_farm_that_publishes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let [controller_port, frontend_port, balancer_port] = farm_ports();
    // Its own executable, as an installed one: the platform upgrade below replaces it.
    let exe = own_paddock(dir.path());
    let (mut up, output) = spawn_up(&mut up_command_from(
        &exe,
        dir.path(),
        2,
        [controller_port, frontend_port, balancer_port],
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let registered = || {
        output
            .lock()
            .unwrap()
            .matches("registered with the controller")
            .count()
    };
    while registered() < 2 || !output.lock().unwrap().contains("Stop: Ctrl-C") {
        assert!(
            Instant::now() < deadline,
            "the farm did not come up:\n{}",
            output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let printed = output.lock().unwrap().clone();
    assert!(
        printed.contains(&format!("controller: http://127.0.0.1:{controller_port}")),
        "{printed}"
    );
    assert!(printed.contains("admin token: "), "{printed}");
    // The console's address signs in with the admin token kept in the data folder.
    let token = std::fs::read_to_string(dir.path().join("controller/admin.token")).unwrap();
    let console = format!(
        "console:    http://127.0.0.1:{controller_port}/#token={}",
        token.trim()
    );
    assert!(printed.contains(&console), "{printed}");
    assert!(
        printed.contains(&format!("balancer:   http://127.0.0.1:{balancer_port}/")),
        "{printed}"
    );

    // The admin token is found in the data folder, as after `paddock up` in a project folder.
    let cli = |args: &[&std::ffi::OsStr]| farm_cli(controller_port, dir.path(), args);
    let admin = |args: &[&str], package: &str| {
        let package = fixture(package);
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.push(package.as_os_str());
        cli(&all)
    };
    let stdout = admin(&["app", "publish"], "hello-v1");
    assert!(stdout.contains("served by all 2 front-end(s)"), "{stdout}");
    for port in [frontend_port, frontend_port + 1] {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let reply = Conn::open(addr)
            .await
            .unwrap()
            .get("/hello/")
            .await
            .unwrap();
        assert_eq!((reply.status, reply.version()), (200, Some("v1")));
    }
    // Once publish returns, the app answers through the balancer.
    let addr = format!("127.0.0.1:{balancer_port}").parse().unwrap();
    let mut conn = Conn::open(addr).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(
            (reply.status, reply.version()),
            (200, Some("v1")),
            "{}",
            reply.body
        );
        ids.push(reply.header("x-request-id").unwrap().to_string());
    }
    // Each is in the balancer's access log, under the id its answer gave.
    let access_log = dir.path().join("lb-1/access.log");
    assert!(
        printed.contains(&format!("access log: {}", access_log.display())),
        "{printed}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ids.iter().all(|id| {
        std::fs::read_to_string(&access_log).is_ok_and(|t| t.contains(&format!("\"{id}\"")))
    }) {
        assert!(
            Instant::now() < deadline,
            "{ids:?} not in {}",
            access_log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The README's balanced deployment: a package folder, uploaded and moved to without downtime.
    let stdout = admin(&["deploy", "--balanced"], "hello-v2");
    assert!(stdout.contains("updating: fe-1"), "{stdout}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    for _ in 0..4 {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!((reply.status, reply.version()), (200, Some("v2")));
    }

    // The README's app data: a session kept in the farm's database, whichever front-end serves.
    admin(&["app", "publish"], "counter-v1");
    let first = conn.get("/counter/visit").await.unwrap();
    assert_eq!(first.body, "visits=1 version=v1\n");
    let cookie = first.header("set-cookie").unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    for n in 2..=3 {
        let reply = conn
            .get_with("/counter/visit", &[("cookie", &cookie)])
            .await
            .unwrap();
        assert_eq!(reply.body, format!("visits={n} version=v1\n"));
    }

    // The README's platform upgrade: every process of the farm shares one executable; the
    // first front-end installs the build over it, the others find it there, and the user's
    // session goes on.
    let new = dir.path().join("new").join("paddock");
    std::fs::create_dir_all(new.parent().unwrap()).unwrap();
    new_build(&new);
    let stdout = cli(&["upgrade".as_ref(), new.as_os_str()]);
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert_eq!(std::fs::read(&exe).unwrap(), std::fs::read(&new).unwrap());
    // fe-1, fe-2, the balancer and the controller restart once each. Their logs reach this test through
    // `paddock up`'s pipes, which may still hold the last lines when the CLI returns.
    let restarts = || output.lock().unwrap().matches("restarting on it").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while restarts() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(restarts(), 4, "{}", output.lock().unwrap());
    // A new connection: the balancer closed the idle one meanwhile.
    let reply = Conn::open(addr)
        .await
        .unwrap()
        .get_with("/counter/visit", &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(reply.body, "visits=4 version=v1\n");

    // A process that dies after the upgrade starts again on the new build: the one now at the
    // path the farm was started from, not the file it replaced.
    let fe1 = number_after(
        &output,
        &format!("fe-1: http://127.0.0.1:{frontend_port}/   (pid "),
    );
    harness::send_signal(fe1, "KILL");
    wait_said(&output, "started fe-1 again (pid ").await;
    let fe1 = number_after(&output, "started fe-1 again (pid ");
    let runs = std::path::PathBuf::from(format!("/proc/{fe1}/exe"));
    assert!(
        runs.exists(),
        "fe-1 (pid {fe1}) is gone:\n{}",
        output.lock().unwrap()
    );
    assert!(harness::is_new_build(&runs));

    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exited(&mut up).await;
    assert!(status.success(), "{status}");
    assert_not_served(&[
        controller_port,
        frontend_port,
        frontend_port + 1,
        balancer_port,
    ]);
}

#[test]
fn up_fails_naming_the_process_that_could_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let controller_port = free_port_pair();
    let balancer_port = free_port_pair();
    // The front-end's port is taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let frontend_port = taken.local_addr().unwrap().port();
    let out = up_command(
        dir.path(),
        1,
        [controller_port, frontend_port, balancer_port],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(!stdout.contains("farm is up"), "{stdout}");
    assert!(
        stderr.contains("fe-1 exited") && stderr.contains("before it was ready"),
        "{stderr}"
    );
    // The controller it had started is stopped.
    assert_not_served(&[controller_port]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_process_again_that_exited_and_stops_when_it_keeps_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let [controller_port, frontend_port, balancer_port] = farm_ports();
    let (mut up, output) = spawn_up(&mut up_command(
        dir.path(),
        2,
        [controller_port, frontend_port, balancer_port],
    ));
    let said = |text: &str| output.lock().unwrap().contains(text);
    wait_said(&output, "Stop: Ctrl-C").await;
    let hello = fixture("hello-v1");
    let stdout = farm_cli(
        controller_port,
        dir.path(),
        &["app".as_ref(), "publish".as_ref(), hello.as_os_str()],
    );
    assert!(stdout.contains("served by all 2 front-end(s)"), "{stdout}");

    // fe-1 dies: it is started again, and serves what it served; users saw nothing of it.
    let fe1 = number_after(
        &output,
        &format!("fe-1: http://127.0.0.1:{frontend_port}/   (pid "),
    );
    harness::send_signal(fe1, "KILL");
    let balancer = format!("127.0.0.1:{balancer_port}").parse().unwrap();
    let mut users = Conn::open(balancer).await.unwrap();
    let fe1_addr = format!("127.0.0.1:{frontend_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = users.get("/hello/").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        if said("started fe-1 again (pid ")
            && let Ok(mut conn) = Conn::open(fe1_addr).await
            && let Ok(reply) = conn.get("/hello/").await
            && reply.status == 200
        {
            assert_eq!(reply.version(), Some("v1"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fe-1 did not come back:\n{}",
            output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        said("fe-1 exited (signal: 9 (SIGKILL)); starting it again in 2s"),
        "{}",
        output.lock().unwrap()
    );

    // fe-1 dies again and its port is taken meanwhile: it cannot start, and once it exited 3
    // times in a row soon after its start, `paddock up` stops the farm, naming it.
    harness::send_signal(number_after(&output, "started fe-1 again (pid "), "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    let _taken = loop {
        match std::net::TcpListener::bind(("127.0.0.1", frontend_port)) {
            Ok(listener) => break listener,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let status = wait_exited(&mut up).await;
    assert!(!status.success(), "{status}");
    wait_said(&output, "then run `paddock up` again").await;
    assert!(
        said("fe-1 ended 3 times in a row within 10s of its start (last: it exited"),
        "{}",
        output.lock().unwrap()
    );
    assert_not_served(&[controller_port, frontend_port + 1, balancer_port]);
}
