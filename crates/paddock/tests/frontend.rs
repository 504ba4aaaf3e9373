//! `paddock frontend` end to end: the real binary, real components, loopback connections.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::{Conn, Frontend, replace_package, write_atomically};

const CLIENTS: usize = 8;

/// What one load client saw: the version of each answered request, and every failure.
#[derive(Default)]
struct ClientRecord {
    versions: Vec<String>,
    /// When each answer in `versions` arrived.
    answered_at: Vec<Instant>,
    failures: Vec<String>,
}

/// Runs a keep-alive client until `stop`, at most `max` requests.
async fn load_client(
    addr: std::net::SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    max: usize,
) -> ClientRecord {
    let mut record = ClientRecord::default();
    let mut conn = Conn::open(addr).await.expect("connect");
    while !stop.load(Ordering::Relaxed) && record.versions.len() + record.failures.len() < max {
        match conn.get(path).await {
            Ok(reply) if reply.status == 200 => {
                record
                    .versions
                    .push(reply.version().unwrap_or("?").to_string());
                record.answered_at.push(Instant::now());
            }
            Ok(reply) => record
                .failures
                .push(format!("{} {}", reply.status, reply.body)),
            Err(e) => {
                record.failures.push(format!("{e:#}"));
                match Conn::open(addr).await {
                    Ok(c) => conn = c,
                    Err(_) => break,
                }
            }
        }
    }
    record
}

fn count(versions: &[String], version: &str) -> usize {
    versions.iter().filter(|v| *v == version).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_loses_no_request_and_never_goes_back() {
    let frontend = Frontend::builder("swap")
        .package("hello-v1", "hello")
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(load_client(frontend.addr, "/hello/", stop.clone(), 50_000)))
        .collect();

    // Slow requests that begin on v1 and are still running when v2 is swapped in.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let addr = frontend.addr;
            tokio::spawn(async move {
                let reply = Conn::open(addr)
                    .await
                    .unwrap()
                    .get("/hello/slow?sleep_ms=6000")
                    .await;
                (reply, Instant::now())
            })
        })
        .collect();
    frontend
        .wait_for_health(
            "the slow requests in flight",
            Duration::from_secs(10),
            |h| h["in_flight"].as_u64().unwrap_or(0) >= 4,
        )
        .await;

    let before_swap = frontend.log_len();
    replace_package(&frontend.apps_dir, "hello", "hello-v2");
    frontend
        .wait_for_log_after(before_swap, "app deployed", Duration::from_secs(60))
        .await;
    let swapped_at = Instant::now();
    // Let every client run on v2 for a while, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for (i, client) in clients.into_iter().enumerate() {
        let record = client.await.unwrap();
        total += record.versions.len();
        assert!(
            record.failures.is_empty(),
            "client {i} failed: {:?}",
            record.failures
        );
        let first_v2 = record.versions.iter().position(|v| v == "v2");
        let first_v2 = first_v2.unwrap_or_else(|| panic!("client {i} never saw v2"));
        assert!(first_v2 > 0, "client {i} never saw v1");
        assert!(
            record.versions[..first_v2].iter().all(|v| v == "v1")
                && record.versions[first_v2..].iter().all(|v| v == "v2"),
            "client {i} went back in version: {} v1 and {} v2 in order {:?}",
            count(&record.versions, "v1"),
            count(&record.versions, "v2"),
            record.versions
        );
    }
    assert!(
        total > 100,
        "the load was too light to mean anything: {total} requests"
    );

    for slow in slow {
        let (reply, done_at) = slow.await.unwrap();
        let reply = reply.expect("slow request answered");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.version(),
            Some("v1"),
            "a request begun on v1 finishes on v1"
        );
        assert_eq!(reply.body, "hello from v1\n");
        assert!(
            done_at > swapped_at,
            "the slow request was still running at the swap"
        );
    }
    let (_, health) = frontend.health().await;
    assert_eq!(health["apps"][0]["version"], "v2");
    assert_eq!(health["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trap_timeout_and_memory_hog_leave_other_apps_answering() {
    let frontend = Frontend::builder("isolation")
        .package("hello-v1", "hello")
        .package("trap", "trap")
        .package("spin", "spin")
        .package("hog", "hog")
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let hello = tokio::spawn(load_client(frontend.addr, "/hello/", stop.clone(), 50_000));

    // Hello answers before the bad apps start.
    frontend
        .wait_for_health("hello under load", Duration::from_secs(10), |h| {
            h["in_flight"] == 1
        })
        .await;
    let spin_started = Instant::now();
    let addr = frontend.addr;
    let bad = |path: &'static str| {
        tokio::spawn(async move { Conn::open(addr).await.unwrap().get(path).await.unwrap() })
    };
    // As many spinning instances as the machine has cores, and more, at once.
    let spins: Vec<_> = (0..4).map(|_| bad("/spin/")).collect();
    let traps: Vec<_> = (0..4).map(|_| bad("/trap/boom")).collect();
    let hogs: Vec<_> = (0..2).map(|_| bad("/hog/")).collect();

    for trap in traps {
        let reply = trap.await.unwrap();
        assert_eq!(reply.status, 500, "{}", reply.body);
        assert_eq!(reply.header("x-paddock-app"), Some("trap"));
        assert!(reply.body.contains("the app failed"), "{}", reply.body);
    }
    // A trap after the response head: the client sees the answer break off, never a whole 200
    // with a cut-off body.
    let cut = Conn::open(addr)
        .await
        .unwrap()
        .get("/trap/half?after_head=1")
        .await;
    assert!(
        cut.is_err(),
        "a cut-off body was delivered as whole: {:?}",
        cut.map(|r| (r.status, r.body))
    );
    for hog in hogs {
        let reply = hog.await.unwrap();
        assert_eq!(reply.status, 500, "{}", reply.body);
    }
    for spin in spins {
        let reply = spin.await.unwrap();
        assert_eq!(reply.status, 504, "{}", reply.body);
        assert_eq!(reply.header("x-paddock-version"), Some("v1"));
    }
    let spin_ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let hello = hello.await.unwrap();
    let during_spin = hello
        .answered_at
        .iter()
        .filter(|t| **t > spin_started && **t < spin_ended)
        .count();
    let spin_wait = spin_ended - spin_started;
    eprintln!(
        "hello answered {during_spin} requests while 4 spinning instances ran for {spin_wait:?}"
    );
    assert!(
        hello.failures.is_empty(),
        "hello failed: {:?}",
        hello.failures
    );
    assert!(
        during_spin >= 20,
        "hello was starved while spin ran ({during_spin} requests in {spin_wait:?})"
    );

    // Each failure is logged once with app, version and request.
    let log = frontend.log();
    let line = |needle: &str, app: &str| {
        log.lines()
            .find(|l| l.contains(needle) && l.contains(&format!("app={app} ")))
            .unwrap_or_else(|| panic!("no {needle:?} line for {app} in log:\n{log}"))
            .to_string()
    };
    let trap_line = line("app trapped", "trap");
    assert!(
        trap_line.contains("version=v1")
            && trap_line.contains("request=")
            && trap_line.contains("path=/trap/boom"),
        "{trap_line}"
    );
    assert!(line("request timed out", "spin").contains("interrupt"));
    assert!(line("app trapped", "hog").contains("growing memory"));
    // The panic message reached the log as the app's stderr.
    assert!(
        log.contains("trap app asked to fail on /trap/boom"),
        "{log}"
    );

    // And everything still answers afterwards.
    let reply = frontend.connect().await.get("/hello/").await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_component_and_bad_manifest_are_refused_and_change_nothing() {
    let frontend = Frontend::builder("refuse")
        .package("hello-v1", "hello")
        .start()
        .await;
    let hello = frontend.apps_dir.join("hello");
    let good_manifest = std::fs::read_to_string(hello.join("paddock.toml")).unwrap();
    let good_component = std::fs::read(hello.join("hello.wasm")).unwrap();

    // A malformed component.
    let mark = frontend.log_len();
    write_atomically(&hello.join("hello.wasm"), b"\0asm this is not a component");
    let line = frontend
        .wait_for_log_after(mark, "package refused", Duration::from_secs(30))
        .await;
    assert!(line.contains("not a valid WebAssembly component"), "{line}");
    assert!(line.contains("hello.wasm"), "{line}");
    assert_still_v1(&frontend).await;

    // A manifest with a misspelt key, with the good component back.
    write_atomically(&hello.join("hello.wasm"), &good_component);
    let mark = frontend.log_len();
    write_atomically(
        &hello.join("paddock.toml"),
        good_manifest
            .replace("route =", "rout =")
            .replace("\"v1\"", "\"v3\"")
            .as_bytes(),
    );
    let line = frontend
        .wait_for_log_after(mark, "package refused", Duration::from_secs(30))
        .await;
    assert!(line.contains("unknown field `rout`"), "{line}");
    assert_still_v1(&frontend).await;

    // A new package whose route is under /_paddock: refused, not deployed.
    let mark = frontend.log_len();
    harness::install_package(&frontend.apps_dir, "slow", "sneaky");
    write_atomically(
        &frontend.apps_dir.join("sneaky/paddock.toml"),
        b"name = \"sneaky\"\ncomponent = \"slow.wasm\"\nroute = \"/_paddock/health\"\n",
    );
    let line = frontend
        .wait_for_log_after(mark, "package refused", Duration::from_secs(30))
        .await;
    assert!(
        line.contains("`route`") && line.contains("reserved"),
        "{line}"
    );
    let (status, health) = frontend.health().await;
    assert_eq!(status, 200);
    assert_eq!(health["apps"].as_array().unwrap().len(), 1, "{health}");

    // `paddock check` says the same, and fails.
    let out = std::process::Command::new(harness::PADDOCK)
        .arg("check")
        .arg(frontend.apps_dir.join("sneaky"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reserved for Paddock"), "{stderr}");
    let out = std::process::Command::new(harness::PADDOCK)
        .arg("check")
        .arg(harness::fixture("hello-v2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello v2 ok"));

    // A package renamed to another app, keeping its route: the new app takes the route over in
    // one step, the old one is gone.
    let mark = frontend.log_len();
    write_atomically(
        &hello.join("paddock.toml"),
        b"name = \"howdy\"\nversion = \"v1\"\ncomponent = \"hello.wasm\"\nroute = \"/hello\"\n",
    );
    frontend
        .wait_for_log_after(mark, "package renamed to howdy", Duration::from_secs(30))
        .await;
    let (_, health) = frontend.health().await;
    let names: Vec<_> = health["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["howdy"], "{health}");
    let reply = frontend.connect().await.get("/hello/").await.unwrap();
    assert_eq!(
        (reply.status, reply.header("x-paddock-app")),
        (200, Some("howdy"))
    );
}

async fn assert_still_v1(frontend: &Frontend) {
    let reply = frontend.connect().await.get("/hello/").await.unwrap();
    assert_eq!(
        (reply.status, reply.version()),
        (200, Some("v1")),
        "{}",
        reply.body
    );
    let (_, health) = frontend.health().await;
    assert_eq!(health["apps"][0]["version"], "v1", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_unknown_paths_get_a_plain_404() {
    let frontend = Frontend::builder("routes")
        .package("hello-v1", "hello")
        .package("slow", "deep")
        .start()
        .await;
    // Give `slow` a route inside hello's: the longer prefix must win.
    let mark = frontend.log_len();
    write_atomically(
        &frontend.apps_dir.join("deep/paddock.toml"),
        b"name = \"slow\"\nversion = \"v1\"\ncomponent = \"slow.wasm\"\nroute = \"/hello/deep\"\n",
    );
    frontend
        .wait_for_log_after(mark, "route=/hello/deep", Duration::from_secs(30))
        .await;

    let mut conn = frontend.connect().await;
    let cases = [
        ("/hello", Some("hello")),
        ("/hello/deeper", Some("hello")),
        ("/hello/deep?ms=1", Some("slow")),
        ("/hello/deep/x?ms=1", Some("slow")),
        ("/helloworld", None),
        ("/", None),
        ("/_paddock/anything", None),
    ];
    for (path, app) in cases {
        let reply = conn.get(path).await.unwrap();
        assert_eq!(reply.header("x-paddock-app"), app, "{path}");
        assert_eq!(reply.header("x-paddock-server"), Some("routes"), "{path}");
        match app {
            Some(_) => assert_eq!(reply.status, 200, "{path}: {}", reply.body),
            None => {
                assert_eq!(reply.status, 404, "{path}");
                assert_eq!(
                    reply.body, "not found\n",
                    "{path}: a 404 names nothing internal"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_stopping_and_finishes_requests_in_flight() {
    let mut frontend = Frontend::builder("graceful")
        .package("slow", "slow")
        .arg("--drain-delay")
        .arg("1s")
        .start()
        .await;
    let (status, health) = frontend.health().await;
    assert_eq!((status, health["state"].as_str()), (200, Some("serving")));

    let slow: Vec<_> = (0..6)
        .map(|_| {
            let addr = frontend.addr;
            tokio::spawn(async move { Conn::open(addr).await.unwrap().get("/slow/?ms=2500").await })
        })
        .collect();
    // A keep-alive connection opened before the signal, to ask for health during the drain.
    let mut watcher = frontend.connect().await;
    frontend
        .wait_for_health("six requests in flight", Duration::from_secs(10), |h| {
            h["in_flight"] == 6
        })
        .await;

    frontend.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = watcher.get("/_paddock/health").await.unwrap();
        if reply.status == 503 {
            assert!(
                reply.body.contains("\"state\":\"stopping\""),
                "{}",
                reply.body
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never went 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for request in slow {
        let reply = request.await.unwrap().expect("in-flight request answered");
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let status = frontend.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        frontend.log().contains("every request answered"),
        "{}",
        frontend.log()
    );
    assert!(
        Conn::open(frontend.addr).await.is_err(),
        "nothing listens after the shutdown"
    );
}

#[test]
fn a_frontend_raises_its_open_files_limit_and_says_when_it_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps");
    std::fs::create_dir(&apps).unwrap();
    let mut args: Vec<std::ffi::OsString> = ["frontend", "--listen", "127.0.0.1:0"]
        .map(Into::into)
        .to_vec();
    args.extend([
        "--name".into(),
        "fe1".into(),
        "--apps".into(),
        apps.into(),
        "--data".into(),
        dir.path().join("data").into(),
    ]);
    harness::open_files_limit_raised_and_said(
        &args,
        "listening on http://",
        "one per client connection",
    );
}
