//! The balancer end to end: a real controller, real front-ends and real `paddock balancer`
//! processes on loopback, driven through the CLI; load from keep-alive clients.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    Balancer, Conn, Controller, Db, Frontend, Load, failures, fixture, tls_connect,
    tls_connect_offering, tls_fixture,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn farm(test: &str, db: Db, frontends: &[&str]) -> (Controller, Vec<Frontend>) {
    let controller = Controller::start(db, test, &[]).await;
    let mut started = Vec::new();
    for name in frontends {
        started.push(
            Frontend::builder(name)
                .controller(&controller, "default")
                .start()
                .await,
        );
    }
    for package in ["hello-v1", "slow"] {
        controller.ok(&["app", "publish", &fixture(package).display().to_string()]);
    }
    (controller, started)
}

fn by_server(samples: &[harness::Sample]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in samples {
        *counts
            .entry(s.server.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    counts
}

/// The front-ends that answer `requests` GETs of /hello, each of which must succeed.
async fn servers_seen(
    conn: &mut harness::Conn,
    requests: usize,
) -> std::collections::BTreeSet<String> {
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..requests {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        servers.insert(reply.header("x-paddock-server").unwrap().to_string());
    }
    servers
}

/// The controller's current generation, from `paddock routing --json`.
fn generation(controller: &Controller) -> i64 {
    let routing: serde_json::Value =
        serde_json::from_str(&controller.ok(&["routing", "--json"])).unwrap();
    routing["table"]["generation"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_and_least_connections_prefers_the_idle_server() {
    let (controller, _fes) = farm("lb_policies", Db::Sqlite, &["fe1", "fe2", "fe3"]).await;
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1", "fe2", "fe3"], true).await;

    let mut conn = lb.connect().await;
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        *seen
            .entry(reply.header("x-paddock-server").unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{seen:?}"
    );
    let metrics = lb.metrics().await;
    assert!(
        metrics.contains(r#"paddock_balancer_requests_total{app="hello",version="v1",status="200",server="fe1"} 10"#),
        "{metrics}"
    );
    assert!(metrics.contains("paddock_balancer_request_duration_seconds_bucket"));
    assert!(metrics.contains(r#"paddock_balancer_upstream_up{server="fe2",zone="default"} 1"#));
    assert!(metrics.contains("paddock_balancer_routing_generation "));

    let out = controller.ok(&["zone", "defualt", "policy", "ratio"]);
    assert!(
        out.contains("no front-end is in zone defualt yet"),
        "a misspelt zone is named: {out}"
    );
    let out = controller.ok(&["zone", "default", "policy", "least-connections"]);
    assert!(!out.contains("no front-end"), "{out}");
    let g = generation(&controller);
    lb.wait_status("the new policy", |s| s["generation"].as_i64() >= Some(g))
        .await;
    // One slow request keeps one server busy...
    let slow = tokio::spawn({
        let addr = lb.addr;
        async move {
            let mut conn = harness::Conn::open(addr).await.unwrap();
            conn.get("/slow?ms=3000").await.unwrap()
        }
    });
    let status = lb
        .wait_status("a request in flight", |s| {
            s["upstreams"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["in_flight"] == 1)
        })
        .await;
    let busy = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["in_flight"] == 1)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    // ...and no other request goes there while it lasts; round-robin would send a third.
    let started = Instant::now();
    for _ in 0..12 {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(reply.status, 200);
        assert_ne!(reply.header("x-paddock-server"), Some(busy.as_str()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the slow request was still running"
    );
    let slow = slow.await.unwrap();
    assert_eq!(
        (slow.status, slow.header("x-paddock-server")),
        (200, Some(busy.as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_evenly_over_the_event_loops() {
    let (controller, _fes) = farm("lb_loops", Db::Sqlite, &["fe1"]).await;
    let lb = Balancer::start(
        &controller,
        "lb1",
        &["--threads", "3", "--pin-threads", "on"],
    )
    .await;
    lb.wait_up(&["fe1"], true).await;

    // --pin-threads on: each event loop is bound to one CPU, spread over the CPUs it may use.
    let loops = lb.loop_cpus();
    assert_eq!(loops.len(), 3, "the event loops' CPUs: {loops:?}");
    for cpus in &loops {
        assert!(cpus.parse::<usize>().is_ok(), "a loop may run on {cpus}");
    }
    let allowed = std::thread::available_parallelism().unwrap().get();
    let bound: std::collections::BTreeSet<_> = loops.iter().collect();
    assert_eq!(bound.len(), allowed.min(3), "CPUs used: {bound:?}");
    let on_loop = |index: usize| {
        let lb = &lb;
        async move {
            lb.metric_sum(
                "paddock_balancer_client_connections",
                &[&format!(r#"event_loop="{index}""#)],
            )
            .await
        }
    };
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut conn = lb.connect().await;
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        conns.push(conn);
    }
    for index in 0..3 {
        assert_eq!(on_loop(index).await, 2, "{}", lb.metrics().await);
    }
    // Every loop serves its own: each connection still answers.
    for conn in &mut conns {
        assert_eq!(conn.get("/hello").await.unwrap().status, 200);
    }
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(5);
    for index in 0..3 {
        while on_loop(index).await != 0 {
            assert!(
                Instant::now() < deadline,
                "closed connections still counted: {}",
                lb.metrics().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// With one event loop per CPU the process may use (the default layout), each loop is bound to
/// its own CPU unless `--pin-threads off`; with more loops than CPUs, none is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_loops_are_bound_by_default_when_there_is_one_per_cpu() {
    let table = serde_json::json!({
        "generation": 1,
        "zones": [{"zone": "default", "policy": "round-robin", "upstreams": [
            {"name": "fe1", "address": "127.0.0.1:9", "state": "ready", "weight": 1}]}],
        "routes": [{"prefix": "/hello", "app": "hello", "zone": "default"}]
    });
    let own = harness::cpus_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let cpus: usize = own
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();

    let n = cpus.to_string();
    let lb = Balancer::with_table("lb-auto", &table, &["--threads", &n]).await;
    let loops = lb.loop_cpus();
    assert_eq!(loops.len(), cpus, "the event loops' CPUs: {loops:?}");
    for cpu in &loops {
        assert!(cpu.parse::<usize>().is_ok(), "a loop may run on {cpu}");
    }
    let bound: std::collections::BTreeSet<_> = loops.iter().collect();
    assert_eq!(bound.len(), cpus, "one CPU per loop: {loops:?}");
    drop(lb);

    let more = (cpus + 1).to_string();
    for (threads, args) in [
        (cpus + 1, vec!["--threads", &more]),
        (cpus, vec!["--threads", &n, "--pin-threads", "off"]),
    ] {
        let lb = Balancer::with_table("lb-free", &table, &args).await;
        let loops = lb.loop_cpus();
        assert!(
            loops.len() == threads && loops.iter().all(|l| *l == own),
            "{args:?}: the loops should run on {own}, not {loops:?}"
        );
    }
}

async fn drain_under_load_with_two_balancers(db: Db, test: &str) {
    let (controller, _fes) = farm(test, db, &["fe1", "fe2", "fe3"]).await;
    let lb1 = Balancer::start(&controller, "lb1", &[]).await;
    let lb2 = Balancer::start(&controller, "lb2", &[]).await;
    for lb in [&lb1, &lb2] {
        lb.wait_up(&["fe1", "fe2", "fe3"], true).await;
    }
    let routing = controller.ok(&["routing"]);
    assert!(
        routing.contains("applied by every live balancer")
            && routing.contains("lb1")
            && routing.contains("lb2"),
        "{routing}"
    );

    // Slow requests first, one per server (round-robin), so that the drained one has one in
    // flight; then the load.
    let slow_sent = Instant::now();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let addr = lb1.addr;
            tokio::spawn(async move {
                let mut conn = harness::Conn::open(addr).await.unwrap();
                let reply = conn.get("/slow?ms=1500").await.unwrap();
                (Instant::now(), reply)
            })
        })
        .collect();
    lb1.wait_status("3 slow requests in flight", |s| {
        s["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["in_flight"] == 1)
    })
    .await;
    let load1 = Load::start(lb1.addr, "/hello", 3, Duration::from_millis(2));
    let load2 = Load::start(lb2.addr, "/hello", 3, Duration::from_millis(2));

    let out = controller.ok(&["server", "fe2", "lb", "drain", "--wait"]);
    let drained_at = Instant::now();
    assert!(
        out.contains("acknowledged by 2 live balancer(s)") && out.contains("drained"),
        "{out}"
    );
    // Drained means its slow request finished first (it cannot end before 1.5 s), and well.
    assert!(
        drained_at >= slow_sent + Duration::from_millis(1500),
        "drain confirmed while fe2's slow request was still running"
    );
    let mut slow_servers = Vec::new();
    for handle in slow {
        let (_, reply) = handle.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        slow_servers.push(reply.header("x-paddock-server").unwrap().to_string());
    }
    slow_servers.sort();
    assert_eq!(slow_servers, ["fe1", "fe2", "fe3"]);
    tokio::time::sleep(Duration::from_millis(300)).await; // more load after the drain
    let mut samples = load1.stop().await;
    samples.extend(load2.stop().await);
    assert_eq!(failures(&samples), Vec::<String>::new());
    let late_to_fe2: Vec<_> = samples
        .iter()
        .filter(|s| s.started >= drained_at && s.server.as_deref() == Some("fe2"))
        .collect();
    assert!(
        late_to_fe2.is_empty(),
        "{} requests went to fe2 after the drain",
        late_to_fe2.len()
    );
    assert!(
        samples.iter().filter(|s| s.started >= drained_at).count() > 10,
        "the load went on after the drain"
    );

    // maint takes no traffic either; ready brings it back.
    controller.ok(&["server", "fe2", "lb", "maint", "--wait"]);
    controller.ok(&["server", "fe2", "lb", "ready", "--wait"]);
    lb1.wait_up(&["fe2"], true).await;
    let mut conn = lb1.connect().await;
    let servers = servers_seen(&mut conn, 6).await;
    assert!(servers.contains("fe2"), "{servers:?}");

    // A balancer that stopped reporting is not waited for.
    let mut lb2 = lb2;
    lb2.kill();
    let out = controller.ok(&["server", "fe3", "lb", "drain", "--wait", "--timeout", "20s"]);
    assert!(out.contains("acknowledged by 1 live balancer(s)"), "{out}");

    // Bad input changes nothing.
    let err = controller.fails(&["server", "nope", "lb", "drain"]);
    assert!(err.contains("unknown server \"nope\""), "{err}");
    let err = controller.fails(&["server", "fe1", "lb", "ready", "--weight", "0"]);
    assert!(err.contains("weight 0 is out of range"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_with_two_balancers_sqlite() {
    drain_under_load_with_two_balancers(Db::Sqlite, "lb_drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_with_two_balancers_postgres() {
    drain_under_load_with_two_balancers(Db::Postgres, "lb_drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_frontend_costs_no_request_and_comes_back_after_the_rise_count() {
    let (controller, mut fes) = farm("lb_kill", Db::Sqlite, &["fe1", "fe2", "fe3"]).await;
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1", "fe2", "fe3"], true).await;

    let load = Load::start(lb.addr, "/hello", 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await; // load before the kill
    let fe2 = fes.remove(1);
    let fe2_addr = fe2.addr;
    fe2.signal("KILL");
    let killed_at = Instant::now();
    lb.wait_up(&["fe2"], false).await;
    let retries_when_down = lb.metric_sum("paddock_balancer_retries_total", &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // load after the kill
    let samples = load.stop().await;
    // Once down, fe2 is not tried any more: no request needed another attempt.
    assert_eq!(
        lb.metric_sum("paddock_balancer_retries_total", &[]).await,
        retries_when_down
    );
    assert_eq!(failures(&samples), Vec::<String>::new(), "GETs failed");
    let counts = by_server(&samples);
    assert!(counts.get("fe2").copied().unwrap_or(0) > 0, "{counts:?}");
    let after: Vec<_> = samples
        .iter()
        .filter(|s| s.started > killed_at + Duration::from_millis(100))
        .collect();
    assert!(after.len() > 10 && after.iter().all(|s| s.server.as_deref() != Some("fe2")));
    let metrics = lb.metrics().await;
    assert!(metrics.contains(r#"paddock_balancer_upstream_up{server="fe2",zone="default"} 0"#));
    assert!(
        metrics.contains("paddock_balancer_retries_total{"),
        "the kill was noticed by a request, which was retried: {metrics}"
    );

    // Back on the same address: in rotation again only after `rise` passing checks.
    let offset = lb.log_len();
    let fe2 = Frontend::builder("fe2")
        .controller(&controller, "default")
        .listen(fe2_addr)
        .start()
        .await;
    fe2.wait_serving("hello", "v1", "/hello").await;
    lb.wait_for_log_after(offset, "up: health checks pass", Duration::from_secs(10))
        .await;
    let mut conn = lb.connect().await;
    let servers = servers_seen(&mut conn, 6).await;
    assert!(servers.contains("fe2"), "{servers:?}");

    // Every front-end gone: 503 with a body that says so.
    drop(fe2);
    for fe in &fes {
        fe.signal("KILL");
    }
    lb.wait_up(&["fe1", "fe2", "fe3"], false).await;
    let reply = conn.get("/hello").await.unwrap();
    assert_eq!(reply.status, 503);
    assert!(
        reply.body.contains("no front-end can take hello now")
            && reply.body.contains("0 of them healthy"),
        "{}",
        reply.body
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
}

/// SIGUSR2 after a new executable was installed at the balancer's path: it finishes the
/// requests in flight, closes each client connection after its response, and restarts on the
/// new executable in the same process, on the same sockets; clients that reconnect as browsers
/// do see no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_restarts_on_a_new_executable_without_failing_a_request() {
    let (controller, _fes) = farm("lb_restart", Db::Sqlite, &["fe1", "fe2"]).await;
    let mut lb = Balancer::start_own_executable(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1", "fe2"], true).await;
    let pid = lb.pid().unwrap();
    let loops = lb.loop_cpus();
    let bound = |log: &str| log.matches("event loop bound to its CPU").count();
    assert_eq!(bound(&lb.log()), loops.len(), "{}", lb.log());
    // A file at its path that is no program: the balancer says so and does not restart.
    let exe = lb.own_exe();
    let saved = exe.with_file_name("paddock.saved");
    std::fs::rename(&exe, &saved).unwrap();
    std::fs::write(&exe, b"not a program").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let offset = lb.log_len();
    lb.signal("USR2");
    lb.wait_for_log_after(offset, "not restarting", Duration::from_secs(30))
        .await;
    assert!(lb.log()[offset..].contains("is not a program (no ELF header)"));
    assert!(!lb.log()[offset..].contains("restarting: accepting nothing"));
    assert_eq!(lb.pid(), Some(pid));
    let mut conn = lb.connect().await;
    assert_eq!(conn.get("/hello").await.unwrap().status, 200);
    std::fs::rename(&saved, &exe).unwrap();

    // The new build: the same program with bytes appended, ready beside the old.
    let new = harness::new_build(&exe.with_file_name("paddock.new"));

    const CLIENTS: usize = 6;
    let load = Load::start_as_browser(lb.addr, "/hello", CLIENTS, Duration::from_millis(2));
    // Slow requests in flight across the restart: each must be answered in full first.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut conn = lb.connect().await;
        slow.push(tokio::spawn(async move {
            let reply = conn.get("/slow?ms=1500").await;
            (reply, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // load before the restart
    // Installed by rename over the old.
    std::fs::rename(&new, &exe).unwrap();

    let offset = lb.log_len();
    lb.signal("USR2");
    lb.wait_for_log_after(
        offset,
        "restarting: accepting nothing meanwhile",
        Duration::from_secs(10),
    )
    .await;
    lb.wait_for_log_after(
        offset,
        "listening on the socket the previous process handed over",
        Duration::from_secs(30),
    )
    .await;
    lb.wait_for_log_after(offset, "balancing on http://", Duration::from_secs(30))
        .await;
    let restarted = Instant::now();
    // As many event loops, on the same CPUs: the new program does not inherit loop 0's binding.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bound(&lb.log()[offset..]) < loops.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lb.loop_cpus(), loops, "{}", &lb.log()[offset..]);
    // The same process, now running the new file, on the same ports.
    assert_eq!(lb.pid(), Some(pid));
    assert!(harness::is_new_build(Path::new(&format!(
        "/proc/{pid}/exe"
    ))));
    lb.wait_status("the routing table again", |s| {
        s["generation"].as_i64() > Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // load after the restart
    let samples = load.stop().await;

    assert_eq!(failures(&samples), Vec::<String>::new(), "GETs failed");
    for answer in slow {
        let (reply, answered) = answer.await.unwrap();
        let reply = reply.expect("a slow request in flight was answered");
        assert!(
            answered < restarted,
            "answered before the new process took over"
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.header("connection"),
            Some("close"),
            "{:?}",
            reply.headers
        );
    }
    let after = samples.iter().filter(|s| s.started > restarted).count();
    assert!(after > 10, "{after} requests after the restart");
    // Each client's connection was closed by the restart once at the most.
    let retried = samples.iter().filter(|s| s.retried).count();
    assert!(retried <= CLIENTS, "{retried} requests sent again");

    // SIGTERM during a restart's drain: it stops instead, once the request in flight is
    // answered, and its port closes.
    let mut conn = lb.connect().await;
    let slow = tokio::spawn(async move { conn.get("/slow?ms=1000").await });
    lb.wait_status("a request in flight", |s| {
        s["upstreams"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["in_flight"].as_u64() > Some(0)))
    })
    .await;
    let offset = lb.log_len();
    lb.signal("USR2");
    lb.wait_for_log_after(
        offset,
        "restarting: accepting nothing",
        Duration::from_secs(10),
    )
    .await;
    lb.signal("TERM");
    lb.wait_for_log_after(
        offset,
        "stopping instead of restarting",
        Duration::from_secs(10),
    )
    .await;
    assert!(lb.wait_exit(Duration::from_secs(30)).await.success());
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    assert!(
        !lb.log()[offset..].contains("balancing on"),
        "it did not start again"
    );
    assert!(tokio::net::TcpStream::connect(lb.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_keeps_its_table_without_the_controller() {
    let (mut controller, _fes) = farm("lb_keep", Db::Sqlite, &["fe1"]).await;
    let mut lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1"], true).await;
    // A front-end that registers later is in the table at once (not after a long-poll's 25 s).
    let joined = Instant::now();
    let _fe2 = Frontend::builder("fe2")
        .controller(&controller, "default")
        .start()
        .await;
    lb.wait_up(&["fe2"], true).await;
    assert!(
        joined.elapsed() < Duration::from_secs(10),
        "{:?}",
        joined.elapsed()
    );
    controller.kill();
    let reply = lb.connect().await.get("/hello").await.unwrap();
    assert_eq!(reply.status, 200);
    // Restarted while the controller is still down: it routes by the table it saved.
    lb.restart().await;
    lb.wait_up(&["fe1"], true).await;
    let reply = lb.connect().await.get("/hello").await.unwrap();
    assert_eq!((reply.status, reply.version()), (200, Some("v1")));
    assert!(lb.log().contains("routing by the saved table"));
    controller.restart().await;
    controller.ok(&["server", "fe1", "lb", "drain", "--wait"]);
}

/// Runs `paddock ARGS` that must refuse to start: it exits within 10 s (killed and failed
/// otherwise) with a failure status; returns its stderr.
fn refused(args: &[&str]) -> String {
    let mut child = std::process::Command::new(harness::PADDOCK)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`paddock {}` started instead of refusing", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "`paddock {}` succeeded",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn flags_that_cannot_work_are_refused_naming_the_flag() {
    // The table is never read: the flags are refused before anything starts.
    let balancer = [
        "balancer",
        "--table",
        "never-read.json",
        "--admin",
        "127.0.0.1:0",
    ];
    let frontend = ["frontend"];
    for (command, flag, value, expected) in [
        (&balancer[..], "--check-interval", "0s", "more than zero"),
        (&balancer, "--check-timeout", "0ms", "more than zero"),
        (&balancer, "--response-timeout", "0s", "more than zero"),
        (&balancer, "--header-timeout", "0s", "more than zero"),
        (&balancer, "--idle-timeout", "0s", "more than zero"),
        (&balancer, "--connect-timeout", "0s", "more than zero"),
        (
            &balancer,
            "--response-timeout",
            "400d",
            "longer than the 7 days",
        ),
        (&balancer, "--check-interval", "soon", "500ms"),
        (&balancer, "--threads", "0", "1 or more"),
        (&balancer, "--max-headers", "0", "1 or more"),
        (
            &balancer,
            "--access-log",
            "/no-such-folder/access.log",
            "a folder that exists",
        ),
        (&frontend, "--max-instances", "0", "not in 1.."),
        (&frontend, "--scan-interval", "0s", "more than zero"),
        (&frontend, "--shutdown-timeout", "9999w", "7 days"),
    ] {
        let mut args = command.to_vec();
        args.extend(["--listen", "127.0.0.1:0", flag, value]);
        let err = refused(&args);
        assert!(
            err.contains(flag) && err.contains(expected),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
fn a_balancer_raises_its_open_files_limit_and_says_when_it_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let empty = serde_json::json!({"generation": 1, "zones": [], "routes": []});
    let args = table_balancer_args(dir.path(), &empty, &[]);
    harness::open_files_limit_raised_and_said(&args, "balancing on http://", "two per client");
}

/// The command line of a balancer routing by `table` (written into `dir`, its data there too).
fn table_balancer_args(
    dir: &Path,
    table: &serde_json::Value,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let file = dir.join("table.json");
    std::fs::write(&file, table.to_string()).unwrap();
    let mut args: Vec<std::ffi::OsString> = [
        "balancer",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]
    .map(Into::into)
    .to_vec();
    args.extend(extra.iter().map(Into::into));
    args.extend([
        "--table".into(),
        file.into(),
        "--data".into(),
        dir.join("lb").into(),
    ]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_out_of_descriptors_answers_503_and_takes_no_frontend_for_failed() {
    // Every health check opens a connection, so that checks meet the shortage too.
    let upstream = echo_upstream_with(Arc::new(tokio::sync::Notify::new()), true).await;
    let dir = tempfile::tempdir().unwrap();
    let args = table_balancer_args(
        dir.path(),
        &echo_table(upstream),
        &[
            "--threads",
            "1",
            "--header-timeout",
            "60s",
            "--check-interval",
            "100ms",
        ],
    );
    let (lb, lines) = harness::spawn_with_open_files(&args, 256);
    // The first table is applied once its front-ends had their first check, before the port
    // opens.
    harness::next_line(&lines, "up: health checks pass");
    let addr = harness::address_after(
        &harness::next_line(&lines, "balancing on http://"),
        "balancing on http://",
    );
    // A client connected first; then idle ones until the balancer has no descriptor left.
    let mut client = Conn::open(addr).await.unwrap();
    let idle: Vec<_> = (0..300)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    harness::next_line(&lines, "accept failed");
    // A request needing a new connection to the front-end: 503 saying why, at once.
    let reply = client.get("/echo/x").await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("cannot open a connection to a front-end"),
        "{}",
        reply.body
    );
    let said = harness::next_line(&lines, "cannot open a connection to a front-end");
    assert!(said.contains("LimitNOFILE"), "{said}");
    // Checks that could not open their connection, more than the 2 failures that take a
    // front-end down: none of them counts as failed.
    for _ in 0..3 {
        let line = harness::next_line_without(&lines, "health check skipped", &["down"]);
        assert!(line.contains("no connection could be opened"), "{line}");
    }
    // Descriptors free again: the front-end serves at once, never having been taken for down.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.get("/echo/x").await.unwrap();
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{} {}", reply.status, reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(lb);
    // What it wrote since, to its last line.
    let said: Vec<String> = lines.iter().filter(|l| l.contains("down")).collect();
    assert!(said.is_empty(), "{said:?}");
}

/// Sends raw bytes on a new connection and returns what came back until the server closed it
/// (or 5 s passed).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_never_reach_a_frontend() {
    let (controller, _fes) = farm("lb_bad", Db::Sqlite, &["fe1"]).await;
    let lb = Balancer::start(&controller, "lb1", &["--header-timeout", "1s"]).await;
    lb.wait_up(&["fe1"], true).await;
    let forwarded = || lb.requests_counted(&[r#"server="fe1""#]);
    let before = forwarded().await;

    let big = format!(
        "GET /hello HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20_000)
    );
    let many: String = (0..120).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let many = format!("GET /hello HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("oversized head", big.into_bytes(), "431"),
        ("too many headers", many.into_bytes(), "431"),
        (
            "Content-Length with Transfer-Encoding",
            b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            "ambiguous request framing",
        ),
        (
            "Content-Length twice",
            b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".to_vec(),
            "ambiguous request framing",
        ),
        (
            "Content-Length twice, different",
            b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx".to_vec(),
            "400 Bad Request",
        ),
        (
            "smuggled behind a clean request",
            b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nPOST /hello HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".to_vec(),
            "ambiguous request framing",
        ),
        (
            "Transfer-Encoding other than chunked",
            b"POST /hello HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            "only `Transfer-Encoding: chunked` is supported",
        ),
        (
            "invalid Host",
            b"GET /hello HTTP/1.1\r\nHost: bad host!\r\n\r\n".to_vec(),
            "Host header is not a valid",
        ),
        (
            "Host with user info",
            b"GET /hello HTTP/1.1\r\nHost: user@a\r\n\r\n".to_vec(),
            "Host header is not a valid",
        ),
        (
            "two Hosts",
            b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            "more than one Host",
        ),
        (
            "no Host",
            b"GET /hello HTTP/1.1\r\n\r\n".to_vec(),
            "no Host header",
        ),
    ];
    for (what, bytes, expected) in cases {
        let answer = raw(lb.addr, &bytes).await;
        assert!(answer.contains(expected), "{what}: {answer}");
        assert!(
            !answer.contains("x-paddock-server"),
            "{what} reached a front-end: {answer}"
        );
    }
    assert_eq!(
        forwarded().await,
        before,
        "a bad request reached a front-end"
    );

    // A client that does not finish its headers is cut off after the header timeout.
    let mut stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client was not cut off");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(forwarded().await, before);

    // The platform's own paths and unknown routes are answered by the balancer itself.
    let mut conn = lb.connect().await;
    let reply = conn.get("/_paddock/health").await.unwrap();
    assert_eq!(reply.status, 404);
    let reply = conn.get("/nowhere").await.unwrap();
    assert_eq!(reply.status, 404);
    assert!(
        reply.body.contains("no app is routed at /nowhere"),
        "{}",
        reply.body
    );
    // A good request on a clean connection still works, with the forwarding headers.
    let reply = conn.get("/hello").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded().await, before + 1);
}

/// A front-end stand-in for the balancer's request and response paths: `POST /echo/...` answers
/// the body it got, with how it got it (`x-got-length`, `x-got-te`, `x-got-expect`,
/// `x-got-forwarded-for`, `x-got-forwarded-proto`); `GET /echo/stream` answers "part-one", then "part-two" only once
/// `go_on` is notified, then ends; `GET /echo/large` answers 64 MiB.
async fn echo_upstream(go_on: Arc<tokio::sync::Notify>) -> std::net::SocketAddr {
    echo_upstream_with(go_on, false).await
}

/// [`echo_upstream`]; with `close_health`, it closes the connection after each health answer,
/// so that every check opens a new one.
async fn echo_upstream_with(
    go_on: Arc<tokio::sync::Notify>,
    close_health: bool,
) -> std::net::SocketAddr {
    use http_body_util::BodyExt as _;

    /// A response body fed by a channel: each message is a chunk.
    struct Chunks(tokio::sync::mpsc::Receiver<bytes::Bytes>);
    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
        }
    }
    type Reply = http_body_util::Either<http_body_util::Full<bytes::Bytes>, Chunks>;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let go_on = go_on.clone();
            let service = hyper::service::service_fn(
                move |request: http::Request<hyper::body::Incoming>| {
                    let go_on = go_on.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let full = |body: bytes::Bytes| {
                            http_body_util::Either::Left(http_body_util::Full::new(body))
                        };
                        if path == "/_paddock/health" {
                            let report = r#"{"server":"echo","state":"serving","apps":[{"name":"echo","version":"v1","route":"/echo","component_sha256":""}],"in_flight":0}"#;
                            let mut answer = http::Response::new(full(report.into()));
                            if close_health {
                                answer.headers_mut().insert(
                                    http::header::CONNECTION,
                                    http::HeaderValue::from_static("close"),
                                );
                            }
                            return Ok::<_, std::convert::Infallible>(answer);
                        }
                        if path == "/echo/hold" {
                            // Answers once the test lets it.
                            go_on.notified().await;
                            return Ok(http::Response::new(full("held".into())));
                        }
                        if path == "/echo/large" {
                            // Far more than the sockets on the way buffer.
                            return Ok(http::Response::new(full(vec![b'x'; 64 << 20].into())));
                        }
                        if path == "/echo/stream" {
                            let (tx, rx) = tokio::sync::mpsc::channel(2);
                            tokio::spawn(async move {
                                tx.send("part-one\n".into()).await.unwrap();
                                go_on.notified().await;
                                tx.send("part-two\n".into()).await.unwrap();
                            });
                            return Ok(http::Response::new(Reply::Right(Chunks(rx))));
                        }
                        let got = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default()
                        };
                        let (te, expect, forwarded, proto) = (
                            got("transfer-encoding"),
                            got("expect"),
                            got("x-forwarded-for"),
                            got("x-forwarded-proto"),
                        );
                        let (host, cookies) = (
                            got("host"),
                            request.headers().get_all("cookie").iter().count(),
                        );
                        let (cookie, id) = (got("cookie"), got("x-request-id"));
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let response = http::Response::builder()
                            .header("x-got-length", body.len())
                            .header("x-got-te", te)
                            .header("x-got-expect", expect)
                            .header("x-got-forwarded-for", forwarded)
                            .header("x-got-forwarded-proto", proto)
                            .header("x-got-host", host)
                            .header("x-got-cookie", cookie)
                            .header("x-got-cookie-fields", cookies)
                            .header("x-got-request-id", id)
                            .body(full(body))
                            .unwrap();
                        Ok(response)
                    }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// A fixed routing table sending `/echo` to the [`echo_upstream`] at `upstream`.
fn echo_table(upstream: std::net::SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "generation": 1,
        "zones": [{"zone": "default", "policy": "round-robin", "upstreams": [
            {"name": "echo", "address": upstream.to_string(), "state": "ready", "weight": 1}]}],
        "routes": [{"prefix": "/echo", "app": "echo", "zone": "default"}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let upstream = echo_upstream(Arc::new(tokio::sync::Notify::new())).await;
    let table = echo_table(upstream);
    let lb = Balancer::with_table("lb-stall", &table, &["--send-timeout", "1s"]).await;
    let mut client = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    client
        .write_all(b"GET /echo/large HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing: the request stays in flight until the balancer gives up on it.
    lb.wait_status("the large answer in flight", |s| {
        s["upstreams"][0]["in_flight"] == 1
    })
    .await;
    let stalled = std::time::Instant::now();
    lb.wait_status("the stalled client cut off", |s| {
        s["upstreams"][0]["in_flight"] == 0
    })
    .await;
    assert!(stalled.elapsed() < Duration::from_secs(10));
    // What the client gets is cut off: far less than the 64 MiB, then the end of the stream.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
            .await
            .expect("the connection ends")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 64 << 20, "{got} bytes");
}

/// Reads from `stream` into `data` until `done(data)`; each read must come within 10 s.
async fn read_until(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    data: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&[u8]) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while !done(data) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} within 10 s"))
            .unwrap();
        assert!(
            n > 0,
            "closed before {what}: {:?}",
            String::from_utf8_lossy(data)
        );
        data.extend_from_slice(&buf[..n]);
    }
}

/// A whole response at the start of `data`: head (lowercased) and `Content-Length` body.
fn whole_answer(data: &[u8]) -> Option<(String, Vec<u8>)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let body = data.get(end + 4..end + 4 + length)?;
    Some((head, body.to_vec()))
}

/// One response read from a raw connection.
async fn read_answer(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    read_until(stream, &mut data, "a whole answer", |d| {
        whole_answer(d).is_some()
    })
    .await;
    whole_answer(&data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_go_through_both_ways_and_responses_are_streamed() {
    let go_on = Arc::new(tokio::sync::Notify::new());
    let upstream = echo_upstream(go_on.clone()).await;
    let table = echo_table(upstream);
    let lb = Balancer::with_table("lb-bodies", &table, &[]).await;
    let mut client = tokio::net::TcpStream::connect(lb.addr).await.unwrap();

    // A body with a length.
    client
        .write_all(b"POST /echo/a HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"hello world");
    assert!(head.contains("x-got-length: 11"), "{head}");
    assert!(head.contains("x-got-forwarded-for: 127.0.0.1"), "{head}");

    // A `Connection` header naming Content-Length does not strip the framing: the body reaches
    // the front-end as this request's body, not as a request of its own.
    client
        .write_all(b"POST /echo/a2 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 35\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nX: y\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-got-length: 35"), "{head}");
    assert_eq!(body, b"GET /echo/smuggled HTTP/1.1\r\nX: y\r\n");

    // A chunked body, on the same connection: it reaches the front-end chunked.
    client
        .write_all(b"POST /echo/b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut client).await;
    assert_eq!(body, b"hello world", "{head}");
    assert!(head.contains("x-got-te: chunked"), "{head}");

    // A large body, both ways.
    let large: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    client
        .write_all(
            format!(
                "POST /echo/c HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                large.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = client.into_split();
    let upload = {
        let large = large.clone();
        tokio::spawn(async move {
            writer.write_all(&large).await.unwrap();
            writer
        })
    };
    let (head, body) = read_answer(&mut reader).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body == large, "the large body came back changed");
    let writer = upload.await.unwrap();
    let mut client = reader.reunite(writer).unwrap();

    // Expect: 100-continue is answered by the balancer; the front-end gets the body only.
    client
        .write_all(b"POST /echo/d HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut interim = Vec::new();
    read_until(&mut client, &mut interim, "an interim answer", |d| {
        d.ends_with(b"\r\n\r\n")
    })
    .await;
    let interim = String::from_utf8_lossy(&interim);
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    client.write_all(b"ping").await.unwrap();
    let (head, body) = read_answer(&mut client).await;
    assert_eq!(body, b"ping", "{head}");
    assert!(!head.contains("x-got-expect: 100-continue"), "{head}");

    // A response body is relayed as it comes: the first part reaches the client while the
    // front-end has not produced the second yet.
    client
        .write_all(b"GET /echo/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut streamed = Vec::new();
    read_until(
        &mut client,
        &mut streamed,
        "the first part, before the front-end sends the second",
        |d| String::from_utf8_lossy(d).contains("part-one"),
    )
    .await;
    assert!(!String::from_utf8_lossy(&streamed).contains("part-two"));
    go_on.notify_one();
    read_until(
        &mut client,
        &mut streamed,
        "the end of the streamed answer",
        |d| d.ends_with(b"0\r\n\r\n"),
    )
    .await;
    assert!(String::from_utf8_lossy(&streamed).contains("part-two"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_serves_https_with_its_certificate_and_tells_the_frontends() {
    let upstream = echo_upstream(Arc::new(tokio::sync::Notify::new())).await;
    let table = echo_table(upstream);
    // Copies of the certificate and key, which the test renews (badly, then well).
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::copy(tls_fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("key.pem"), &key).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    // A port for plain HTTP, answered with redirects.
    let redirect = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let lb = Balancer::with_table(
        "lb1",
        &table,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--redirect-http",
            &redirect.to_string(),
            "--header-timeout",
            "1s",
        ],
    )
    .await;
    lb.wait_up(&["echo"], true).await;

    // A client that connects and never starts its handshake is cut off after the header
    // timeout, and is no longer counted as open.
    let mut silent = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb
        .metric_sum("paddock_balancer_client_connections", &[])
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "{}", lb.metrics().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client that trusts the test authority: HTTP/1.1 (ALPN), keep-alive, bodies both ways,
    // and the front-end is told the client came over HTTPS (whatever the client claims).
    let mut stream = tls_connect(lb.addr, Some(&tls_fixture("ca.pem")))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    for body in ["hello", "again"] {
        stream
            .write_all(
                format!(
                    "POST /echo/x HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: http\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (head, got) = read_answer(&mut stream).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-got-forwarded-proto: https\r\n"), "{head}");
        assert_eq!(got, body.as_bytes());
    }
    assert_eq!(lb.requests_counted(&[r#"server="echo""#]).await, 2);

    // Plain HTTP on the HTTPS port gets no HTTP answer, and reaches no front-end.
    let answer = raw(lb.addr, b"GET /echo/x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    // A client that does not trust the certificate does not get through either.
    assert!(tls_connect(lb.addr, None).await.is_err());
    // Plain HTTP at --redirect-http is sent to the same host and path over HTTPS, and reaches
    // no front-end either.
    let answer = raw(
        redirect,
        b"GET /echo/x?y=1 HTTP/1.1\r\nHost: localhost:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    assert!(
        answer.contains(&format!(
            "location: https://localhost:{}/echo/x?y=1\r\n",
            lb.addr.port()
        )),
        "{answer}"
    );
    let answer = raw(redirect, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert_eq!(lb.requests_counted(&[r#"server="echo""#]).await, 2);
    assert!(lb.log().contains("balancing on https://"), "{}", lb.log());

    // A key that does not go with the certificate (a renewal half done): SIGUSR2 is refused,
    // naming the problem, and the balancer serves on.
    std::fs::copy(tls_fixture("other-key.pem"), &key).unwrap();
    let offset = lb.log_len();
    lb.signal("USR2");
    lb.wait_for_log_after(offset, "not restarting", Duration::from_secs(30))
        .await;
    assert!(
        lb.log()[offset..].contains("does not go with the certificate"),
        "{}",
        lb.log()
    );
    std::fs::copy(tls_fixture("key.pem"), &key).unwrap();

    // Restarted in place (as for a renewed certificate), it serves HTTPS and the redirects on
    // the same ports, from the sockets it kept. A keep-alive connection to the redirect port
    // is not cut by the restart: its next answer says it closes.
    let mut kept = tokio::net::TcpStream::connect(redirect).await.unwrap();
    let ask = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n";
    kept.write_all(ask).await.unwrap();
    let (head, _) = read_answer(&mut kept).await;
    assert!(head.starts_with("http/1.1 308"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let offset = lb.log_len();
    lb.signal("USR2");
    lb.wait_for_log_after(
        offset,
        "restarting: accepting nothing",
        Duration::from_secs(10),
    )
    .await;
    // Sent within the restart's 250 ms grace (as a client on a live connection does), it is
    // answered, saying the connection closes, and the connection ends cleanly; a client slower
    // than that meets a connection closed cleanly before its request, as after any keep-alive
    // timeout. Cut by the restart instead, it would be answered as if nothing happened, or reset.
    kept.write_all(ask).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), kept.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s")
        .expect("closed cleanly, not reset");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(
        answer.is_empty()
            || (answer.starts_with("http/1.1 308") && answer.contains("connection: close\r\n")),
        "{answer}"
    );
    lb.wait_for_log_after(offset, "balancing on https://", Duration::from_secs(30))
        .await;
    let mut stream = tls_connect(lb.addr, Some(&tls_fixture("ca.pem")))
        .await
        .unwrap();
    stream
        .write_all(b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let answer = raw(
        redirect,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let log = lb.log()[offset..].to_string();
    assert!(
        log.matches("listening on the socket the previous process handed over")
            .count()
            == 3,
        "{log}"
    );
}

/// The lines of the access log at `path` once it holds `count` (at most 10 s).
async fn access_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {} lines, not {count}:\n{text}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The access log line of the request for `target` among `lines`.
fn line_for<'a>(lines: &'a [serde_json::Value], target: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["target"] == target)
        .unwrap_or_else(|| panic!("no line for {target}: {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_tells_every_answer_and_is_reopened_after_rotation() {
    let held = Arc::new(tokio::sync::Notify::new());
    let upstream = echo_upstream(held.clone()).await;
    // Besides /echo, an app whose only front-end is never up.
    let mut table = echo_table(upstream);
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    table["zones"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
        {"zone": "gone", "policy": "round-robin", "upstreams": [
            {"name": "nobody", "address": gone_addr.to_string(), "state": "ready", "weight": 1}]}));
    table["routes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"prefix": "/gone", "app": "gone", "zone": "gone"}));
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let mut lb = Balancer::with_table(
        "lb1",
        &table,
        &["--access-log", &path.display().to_string()],
    )
    .await;
    lb.wait_up(&["echo"], true).await;

    // Relayed from the front-end; answered by the balancer (no app there, a HEAD, no
    // front-end up); refused (no Host).
    let answer = raw(
        lb.addr,
        b"POST /echo/x?y=1 HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw(
        lb.addr,
        b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = raw(
        lb.addr,
        b"HEAD /nothing/head HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = raw(
        lb.addr,
        b"GET /gone/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The balancer's own answer, once the request was on its way, says the request's id.
    let gone_id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {answer}"))
        .to_string();
    let answer = raw(lb.addr, b"GET /echo/no-host HTTP/1.1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A client that goes away before its answer.
    let mut leaving = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    leaving
        .write_all(b"GET /echo/hold HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    lb.wait_status("the held request in flight", |s| {
        s["upstreams"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["name"] == "echo" && u["in_flight"] == 1))
    })
    .await;
    drop(leaving);

    let lines = access_lines(&path, 6).await;
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let relayed = line_for(&lines, "/echo/x?y=1");
    assert_eq!(relayed["client"], "127.0.0.1", "{relayed}");
    assert_eq!(relayed["method"], "POST", "{relayed}");
    assert_eq!(relayed["host"], "shop.example", "{relayed}");
    assert_eq!(relayed["status"], 200, "{relayed}");
    assert_eq!(relayed["bytes"], 5, "{relayed}");
    assert_eq!(relayed["app"], "echo", "{relayed}");
    assert_eq!(relayed["server"], "echo", "{relayed}");
    assert_eq!(relayed["tries"], 1, "{relayed}");
    assert!(
        relayed["request_id"].as_str().unwrap().starts_with("lb1-"),
        "{relayed}"
    );
    assert_eq!(relayed["complete"], true, "{relayed}");
    assert!(relayed["error"].is_null(), "{relayed}");
    assert!(relayed["ms"].as_f64().unwrap() > 0.0, "{relayed}");
    let time = relayed["time"].as_str().unwrap();
    let time = humantime::parse_rfc3339(time).unwrap();
    let age = std::time::SystemTime::now().duration_since(time).unwrap();
    assert!(age < Duration::from_secs(60), "{relayed}");

    let own = line_for(&lines, "/nothing");
    assert_eq!(own["status"], 404, "{own}");
    assert!(own["app"].is_null() && own["server"].is_null(), "{own}");
    assert_eq!(own["tries"], 0, "{own}");
    assert!(own["request_id"].is_null(), "{own}");
    assert!(
        own["error"]
            .as_str()
            .unwrap()
            .starts_with("no app is routed at /nothing"),
        "{own}"
    );
    assert!(own["bytes"].as_u64().unwrap() > 0, "{own}");
    let head = line_for(&lines, "/nothing/head");
    assert_eq!(
        (head["method"].as_str(), head["bytes"].as_u64()),
        (Some("HEAD"), Some(0))
    );
    let unroutable = line_for(&lines, "/gone/x");
    assert_eq!(unroutable["status"], 503, "{unroutable}");
    assert_eq!(unroutable["app"], "gone", "{unroutable}");
    assert_eq!(unroutable["request_id"], gone_id.as_str(), "{unroutable}");
    let refused = line_for(&lines, "/echo/no-host");
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["host"], "", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("Host"),
        "{refused}"
    );
    let left = line_for(&lines, "/echo/hold");
    assert_eq!(left["status"], 499, "{left}");
    assert_eq!(left["complete"], false, "{left}");
    assert_eq!(left["app"], "echo", "{left}");
    assert!(left["server"].is_null(), "{left}");
    let metrics = lb.metrics().await;
    assert!(
        metrics.contains("paddock_balancer_access_log_lost_lines_total 0\n"),
        "{metrics}"
    );

    // Rotated: renamed, then SIGHUP; later lines go to a new file at the path.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    let offset = lb.log_len();
    lb.signal("HUP");
    lb.wait_for_log_after(offset, "opened again", Duration::from_secs(10))
        .await;
    let answer = raw(
        lb.addr,
        b"GET /echo/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let lines = access_lines(&path, 1).await;
    assert_eq!(lines[0]["target"], "/echo/after", "{lines:#?}");
    assert_eq!(access_lines(&rotated, 6).await.len(), 6);

    // A stop writes what the last requests left, however soon it comes after them.
    let answer = raw(
        lb.addr,
        b"GET /echo/last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    lb.signal("TERM");
    assert!(lb.wait_exit(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("/echo/last"), "{text}");
    held.notify_waiters();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_follows_a_request_through_the_balancer_the_frontend_and_the_app() {
    let (controller, fes) = farm("lb_request_id", Db::Sqlite, &["fe1"]).await;
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let lb = Balancer::start(
        &controller,
        "lb1",
        &["--access-log", &path.display().to_string()],
    )
    .await;
    lb.wait_up(&["fe1"], true).await;
    let mut conn = lb.connect().await;

    // Given by the balancer: the app sees it, logs under it, and the client is told it.
    let reply = conn
        .get("/hello/?log=1&env=PADDOCK_REQUEST_ID")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let id = reply.header("x-request-id").unwrap().to_string();
    assert!(id.starts_with("lb1-"), "{id}");
    assert_eq!(reply.body, format!("PADDOCK_REQUEST_ID={id}\n"));
    let logged = access_lines(&path, 1).await;
    assert_eq!(logged[0]["request_id"], id.as_str(), "{logged:#?}");
    let line = fes[0]
        .wait_for_log("says hi on stdout", Duration::from_secs(10))
        .await;
    assert!(line.contains(&format!("request={id}")), "{line}");

    // Another request, another id.
    let reply = conn.get("/hello/").await.unwrap();
    let next = reply.header("x-request-id").unwrap();
    assert!(next.starts_with("lb1-") && next != id, "{next} after {id}");

    // Sent by the client (a proxy in front of the farm): kept all the way; one that would not
    // read the same in a log is replaced.
    let reply = conn
        .get_with(
            "/hello/?env=PADDOCK_REQUEST_ID",
            &[("x-request-id", "edge-7f3e9c1a")],
        )
        .await
        .unwrap();
    assert_eq!(reply.header("x-request-id"), Some("edge-7f3e9c1a"));
    assert_eq!(reply.body, "PADDOCK_REQUEST_ID=edge-7f3e9c1a\n");
    let reply = conn
        .get_with("/hello/", &[("x-request-id", "two words")])
        .await
        .unwrap();
    assert!(
        reply.header("x-request-id").unwrap().starts_with("lb1-"),
        "{:?}",
        reply.header("x-request-id")
    );
    let logged = access_lines(&path, 4).await;
    assert_eq!(logged[2]["request_id"], "edge-7f3e9c1a", "{logged:#?}");

    // Straight to the front-end, without one: the front-end gives its own.
    let reply = fes[0].connect().await.get("/hello/").await.unwrap();
    assert!(
        reply.header("x-request-id").unwrap().starts_with("fe1-"),
        "{:?}",
        reply.header("x-request-id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_apps_limit_is_refused_with_413_naming_it() {
    let (controller, _fes) = farm("lb_body_limit", Db::Sqlite, &["fe1"]).await;
    // hello, as an app that takes bodies of 1 MiB at most.
    let package = harness::hello_package(
        "hello-v1",
        "name = \"upload\"\nversion = \"v1\"\ncomponent = \"hello.wasm\"\nroute = \"/upload\"\n\
         [limits]\nrequest_body_mib = 1\n",
    );
    controller.ok(&["app", "publish", &package.path().display().to_string()]);
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1"], true).await;
    let post = |size: usize| {
        let mut request = format!(
            "POST /upload/ HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend(std::iter::repeat_n(b'x', size));
        request
    };
    // Within the limit: the app answers.
    let answer = raw(lb.addr, &post(512 << 10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello from v1"), "{answer}");
    // Over it: 413 before the app runs, saying the limit.
    let answer = raw(lb.addr, &post((1 << 20) + 1)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("larger than this app takes (1 MiB at most)"),
        "{answer}"
    );
    // The front-end and the balancer serve on.
    let mut conn = lb.connect().await;
    assert_eq!(conn.get("/upload/").await.unwrap().status, 200);

    // A body far larger than the socket buffers, sent while the answer is read (as a client
    // does): the 413 still reaches the client, and the front-end is not taken for failed.
    let log_start = lb.log_len();
    for _ in 0..5 {
        let answer = upload(lb.addr, "/upload/", 32 << 20, false).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // A chunked body, which only the app's reading can measure: within the limit the app
    // reads it all; over it the app's read fails, and the answer is 413 whatever the app made
    // of the failure.
    let answer = upload(lb.addr, "/upload/?read_body=1", 512 << 10, true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello v1 read 524288 bytes"), "{answer}");
    for size in [(1 << 20) + 1, 8 << 20] {
        let answer = upload(lb.addr, "/upload/?read_body=1", size, true).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{size}: {answer}");
        assert!(
            answer.contains("larger than this app takes (1 MiB at most)"),
            "{answer}"
        );
    }
    assert!(
        !lb.log()[log_start..].contains("down at once"),
        "{}",
        &lb.log()[log_start..]
    );
    assert_eq!(conn.get("/upload/").await.unwrap().status, 200);
}

/// POST `size` bytes to `target`, with a `Content-Length` or chunked, reading the answer while
/// the body goes out (as a client does); the answer.
async fn upload(addr: std::net::SocketAddr, target: &str, size: usize, chunked: bool) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {size}")
    };
    let head = format!("POST {target} HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n");
    let sending = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            if chunked {
                write.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            }
            write.write_all(&chunk[..n]).await?;
            if chunked {
                write.write_all(b"\r\n").await?;
            }
            left -= n;
        }
        if chunked {
            write.write_all(b"0\r\n\r\n").await?;
        }
        std::io::Result::Ok(write)
    });
    let mut answer = Vec::new();
    let mut buf = vec![0; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&answer);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                let done = match length {
                    Some(length) => answer.len() >= end + 4 + length,
                    None => text.ends_with("\r\n0\r\n\r\n"),
                };
                if done {
                    break;
                }
            }
        }
    })
    .await;
    sending.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_may_speak_http2_and_frontends_get_http1() {
    use http_body_util::BodyExt as _;

    /// A request body of these parts, of a length said nowhere (sent as it comes); none: a
    /// request without a body.
    struct Parts(std::collections::VecDeque<bytes::Bytes>);
    impl http_body::Body for Parts {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|p| Ok(http_body::Frame::data(p))))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    let go_on = Arc::new(tokio::sync::Notify::new());
    let upstream = echo_upstream(go_on.clone()).await;
    let tls = [
        "--tls-cert",
        &tls_fixture("cert.pem"),
        "--tls-key",
        &tls_fixture("key.pem"),
    ];
    let logs = tempfile::tempdir().unwrap();
    let access_log = logs.path().join("access.log");
    let lb = Balancer::with_table(
        "lb1",
        &echo_table(upstream),
        &[
            &tls[..],
            &["--header-timeout", "3s", "--send-timeout", "2s"],
            &["--access-log", &access_log.display().to_string()],
        ]
        .concat(),
    )
    .await;
    lb.wait_up(&["echo"], true).await;
    let ca = tls_fixture("ca.pem");
    let (sender, connection) = h2_connect(lb.addr, &ca).await;
    let base = format!("https://localhost:{}", lb.addr.port());

    // A GET: the front-end gets the host from :authority, the cookies as one field, and
    // hears the client came over HTTPS, and the request's id.
    let request = http::Request::get(format!("{base}/echo/x"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Parts(Default::default()))
        .unwrap();
    let response = sender.clone().send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let got = |name: &str| response.headers()[name].to_str().unwrap().to_string();
    assert_eq!(got("x-got-host"), format!("localhost:{}", lb.addr.port()));
    assert_eq!(got("x-got-cookie"), "a=1; b=2");
    assert_eq!(got("x-got-cookie-fields"), "1");
    assert_eq!(got("x-got-forwarded-proto"), "https");
    assert_eq!(
        got("x-got-te"),
        "",
        "a request without a body went on with one"
    );
    assert!(got("x-got-request-id").starts_with("lb1-"), "{response:?}");
    // The access log says how the client spoke, and the host it named.
    let lines = access_lines(&access_log, 1).await;
    assert_eq!(lines[0]["protocol"], "HTTP/2.0", "{lines:#?}");
    assert_eq!(
        lines[0]["host"],
        format!("localhost:{}", lb.addr.port()),
        "{lines:#?}"
    );

    // A body of no said length goes on chunked, whole.
    let parts = ["first ", "second ", "third"]
        .map(|p: &'static str| bytes::Bytes::from_static(p.as_bytes()));
    let request = http::Request::post(format!("{base}/echo/x"))
        .body(Parts(parts.into_iter().collect()))
        .unwrap();
    let response = sender.clone().send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-got-te"], "chunked");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "first second third");

    // Many requests at once on the one connection.
    let requests = (0..40).map(|i| {
        let mut sender = sender.clone();
        let uri = format!("{base}/echo/{i}");
        async move {
            let request = http::Request::get(uri)
                .body(Parts(Default::default()))
                .unwrap();
            sender.send_request(request).await.map(|r| r.status())
        }
    });
    for status in all_at_once(requests).await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(lb.requests_counted(&[r#"server="echo""#]).await, 42);

    // A request in progress holds the connection open past the idle time (the header timeout,
    // as for HTTP/1.1); once none is, the balancer closes it.
    let held = tokio::spawn({
        let mut sender = sender.clone();
        let request = http::Request::get(format!("{base}/echo/hold"))
            .body(Parts(Default::default()))
            .unwrap();
        async move { sender.send_request(request).await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!connection.is_finished() && !held.is_finished());
    go_on.notify_one();
    assert_eq!(held.await.unwrap().unwrap(), 200);
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "the idle connection was not closed (with GOAWAY): {closed:?}"
    );
    drop(sender);

    // A client that takes none of a response (its flow-control window stays full) is cut off
    // after the send timeout, as an HTTP/1.1 one that stops reading is.
    let (mut sender, connection) = h2_connect(lb.addr, &ca).await;
    let request = http::Request::get(format!("{base}/echo/large"))
        .body(Parts(Default::default()))
        .unwrap();
    let unread = sender.send_request(request).await.unwrap();
    assert_eq!(unread.status(), 200);
    let cut = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(cut.is_ok(), "a client taking nothing was not cut off");
    drop((unread, sender));

    // A stop lets a request in progress on an HTTP/2 connection finish, then closes it.
    let (mut sender, connection) = h2_connect(lb.addr, &ca).await;
    let request = http::Request::get(format!("{base}/echo/hold"))
        .body(Parts(Default::default()))
        .unwrap();
    let held = tokio::spawn(async move { sender.send_request(request).await.map(|r| r.status()) });
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb
        .metric_sum("paddock_balancer_upstream_in_flight", &[])
        .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the held request never reached the front-end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let offset = lb.log_len();
    lb.signal("TERM");
    lb.wait_for_log_after(offset, "stopping", Duration::from_secs(10))
        .await;
    go_on.notify_one();
    assert_eq!(held.await.unwrap().unwrap(), 200);
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(matches!(closed, Ok(Ok(Ok(())))), "{closed:?}");

    // With --no-http2, HTTP/1.1 is all a client can choose.
    let http1 = Balancer::with_table(
        "lb2",
        &echo_table(upstream),
        &[&tls[..], &["--no-http2"]].concat(),
    )
    .await;
    let stream = tls_connect_offering(http1.addr, Some(&ca), &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

/// An HTTP/2 connection to the balancer at `addr`, trusting `ca`: the client offers h2 and
/// HTTP/1.1, and the balancer chooses h2. Its request sender, and the task driving it.
async fn h2_connect<B>(
    addr: std::net::SocketAddr,
    ca: &str,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tls_connect_offering(addr, Some(ca), &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

/// Awaits every future, each on a task of its own; their outputs in order.
async fn all_at_once<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_taken_on_sighup_without_a_restart() {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;

    let upstream = echo_upstream(Arc::new(tokio::sync::Notify::new())).await;
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::copy(tls_fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("key.pem"), &key).unwrap();
    let lb = Balancer::with_table(
        "lb1",
        &echo_table(upstream),
        &[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ],
    )
    .await;
    lb.wait_up(&["echo"], true).await;
    let pid = lb.pid();
    let first_of = |file: &str| CertificateDer::from_pem_file(tls_fixture(file)).unwrap();
    // A new connection: the certificate it was shown, and a request on it.
    let connect = || async {
        let mut stream = tls_connect(lb.addr, Some(&tls_fixture("ca.pem")))
            .await
            .unwrap();
        let shown = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        ask(&mut stream).await;
        (stream, shown)
    };
    async fn ask(stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin)) {
        stream
            .write_all(b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_answer(stream).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    let (mut before, shown) = connect().await;
    assert_eq!(shown, first_of("cert.pem"));

    // Renewed: the new certificate and key, then SIGHUP. New connections get it; one open
    // before keeps going; the same process serves (no restart, nothing drained).
    std::fs::copy(tls_fixture("renewed-cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("renewed-key.pem"), &key).unwrap();
    let offset = lb.log_len();
    lb.signal("HUP");
    lb.wait_for_log_after(offset, "TLS certificate reloaded", Duration::from_secs(10))
        .await;
    let (_, shown) = connect().await;
    assert_eq!(shown, first_of("renewed-cert.pem"));
    ask(&mut before).await;
    assert_eq!(lb.pid(), pid);
    assert!(!lb.log()[offset..].contains("restarting"), "{}", lb.log());

    // A key that does not go with the certificate: refused, naming it; the renewed one stays.
    std::fs::copy(tls_fixture("other-key.pem"), &key).unwrap();
    let offset = lb.log_len();
    lb.signal("HUP");
    lb.wait_for_log_after(
        offset,
        "TLS certificate not reloaded",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        lb.log()[offset..].contains("does not go with the certificate"),
        "{}",
        lb.log()
    );
    let (_, shown) = connect().await;
    assert_eq!(shown, first_of("renewed-cert.pem"));
}

#[test]
fn tls_files_that_cannot_work_are_refused_naming_the_file() {
    let start = |cert: &str, key: &str| {
        refused(&[
            "balancer",
            "--table",
            "never-read.json",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
    };
    let (cert, key) = (tls_fixture("cert.pem"), tls_fixture("key.pem"));
    let e = start("/no/such/cert.pem", &key);
    assert!(
        e.contains("cannot read the TLS certificate /no/such/cert.pem"),
        "{e}"
    );
    let e = start(&cert, &cert);
    assert!(e.contains("cannot read the TLS private key"), "{e}");
    let e = start(&cert, &tls_fixture("other-key.pem"));
    assert!(e.contains("does not go with the certificate"), "{e}");
    let e = refused(&[
        "balancer",
        "--table",
        "never-read.json",
        "--tls-cert",
        &cert,
    ]);
    assert!(e.contains("--tls-key"), "{e}");
    let e = refused(&[
        "balancer",
        "--table",
        "never-read.json",
        "--redirect-http",
        "127.0.0.1:0",
    ]);
    assert!(e.contains("--tls-cert"), "{e}");
}
