//! Balanced platform upgrade end to end: a controller, three front-ends and two balancers each
//! running from its own `paddock` executable, keep-alive clients through a balancer for the
//! whole operation, driven through the CLI (`paddock upgrade PATH`).
//!
//! The "new build" is the executable under test with bytes appended: it runs the same, and its
//! sha256 (the build's identity) differs, so each front-end must download it, install it over
//! its executable and restart on it.

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::{
    Balancer, Controller, Db, Frontend, Load, PADDOCK, failures, fixture, is_new_build, new_build,
    op_step, tls_connect, tls_fixture,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn servers(controller: &Controller) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&controller.ok(&["servers", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_upgrade_reaches_every_front_end_with_zero_failures() {
    upgrade_under_load(Db::Sqlite, "upgrade").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_upgrade_on_postgresql() {
    upgrade_under_load(Db::Postgres, "upgrade_pg").await;
}

async fn upgrade_under_load(db: Db, test: &str) {
    let controller = Controller::start_own_executable(db, test, &["--platform-upgrades"]).await;
    let controller_pid = controller.pid();
    let names = ["fe1", "fe2", "fe3"];
    let mut frontends = Vec::new();
    for name in names {
        frontends.push(
            Frontend::builder(name)
                .controller(&controller, "default")
                .own_executable()
                .start()
                .await,
        );
    }
    let balancers = [
        Balancer::start_own_executable(&controller, "lb1", &[]).await,
        Balancer::start_own_executable(&controller, "lb2", &[]).await,
    ];
    for lb in &balancers {
        lb.wait_up(&names, true).await;
    }
    let lb = &balancers[0];
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    let pids: Vec<u32> = frontends.iter().map(Frontend::pid).collect();
    let lb_pids: Vec<u32> = balancers.iter().map(|b| b.pid().unwrap()).collect();
    let addresses: Vec<serde_json::Value> = servers(&controller)
        .iter()
        .map(|s| s["address"].clone())
        .collect();

    // Bad input is refused, naming the problem, and keeps nothing.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a program").unwrap();
    let e = controller.fails(&["upgrade", &text.display().to_string()]);
    assert!(e.contains("not an executable (no ELF header)"), "{e}");
    let e = controller.fails(&["upgrade", "/bin/true"]);
    assert!(e.contains("is not Paddock"), "{e}");
    let e = controller.fails(&["upgrade", &"0".repeat(64)]);
    assert!(e.contains("no platform build"), "{e}");
    let e = controller.fails(&["upgrade", "/no/such/paddock"]);
    assert!(e.contains("no such file"), "{e}");
    assert_eq!(
        controller.ok(&["platform", "builds", "--json"]).trim(),
        "[]"
    );

    let new = new_build(&dir.path().join("paddock"));
    let uploaded: serde_json::Value = serde_json::from_str(&controller.ok(&[
        "platform",
        "upload",
        &new.display().to_string(),
        "--json",
    ]))
    .unwrap();
    let sha = uploaded["sha256"].as_str().unwrap().to_string();
    assert_eq!(uploaded["version"], env!("CARGO_PKG_VERSION"));

    // The plan names the groups and changes nothing.
    let plan = controller.ok(&["upgrade", &sha, "--plan"]);
    assert!(plan.contains("updating: fe1"), "{plan}");
    assert!(plan.contains("loaded:   fe2, fe3"), "{plan}");
    for step in [
        "drain-updating",
        "upgrade-updating",
        "smoke",
        "cutover",
        "upgrade-loaded",
        "upgrade-balancers",
        "upgrade-controller",
    ] {
        assert!(plan.contains(step), "{plan}");
    }

    // fe1 (updating) cannot write beside its executable: the operation fails at its first
    // upgrade and puts everything back, while users are served throughout.
    let blocker = frontends[0].own_exe().with_file_name(format!(
        ".paddock-upgrade-{}-{}",
        &sha[..12],
        frontends[0].pid()
    ));
    std::fs::create_dir(&blocker).unwrap();
    // As browsers do, a GET whose idle keep-alive connection the balancer closed as it
    // restarted is sent again on a new connection.
    let load = Load::start_as_browser(lb.addr, "/hello", 4, Duration::from_millis(5));
    let out = controller.cli_async(&["upgrade", &sha]).await;
    assert!(!out.success, "{}", out.stdout);
    assert!(out.stderr.contains("failed"), "{}", out.stderr);
    assert!(
        out.stderr.contains("fe1 cannot install build") && out.stderr.contains("cannot write"),
        "{}",
        out.stderr
    );
    for s in servers(&controller) {
        assert_eq!(s["lb"], "ready", "{s:#}");
        assert!(s["platform_target"].is_null(), "{s:#}");
        assert_ne!(s["observed"]["build"], sha.as_str(), "{s:#}");
    }
    std::fs::remove_dir(&blocker).unwrap();

    // fe1 and fe2 update first; fe1 downloads the build but cannot put it in place (its
    // executable's path is a folder now), while fe2 may get as far as restarting on it. Either
    // way no user reaches the build the operation gave up: a server on it stays drained.
    let exe = frontends[0].own_exe();
    let moved = exe.with_extension("moved");
    std::fs::rename(&exe, &moved).unwrap();
    std::fs::create_dir(&exe).unwrap();
    let out = controller
        .cli_async(&["upgrade", &sha, "--updating", "fe1,fe2"])
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains("fe1 cannot install build") && out.stderr.contains("cannot replace"),
        "{}",
        out.stderr
    );
    // Settled: nothing installing any more (the restore waited for that).
    for s in servers(&controller) {
        assert!(s["observed"]["installing"].is_null(), "{s:#}");
    }
    for s in servers(&controller) {
        let on_new = s["observed"]["build"] == sha.as_str();
        assert_eq!(s["lb"] == "drain", on_new, "{s:#}\n{}", out.stderr);
        assert!(s["platform_target"].is_null(), "{s:#}");
        if s["name"] == "fe1" {
            assert_eq!(s["lb"], "ready", "{s:#}");
        }
    }
    std::fs::remove_dir(&exe).unwrap();
    std::fs::rename(&moved, &exe).unwrap();
    // fe2, if it is on the build, is left alone by the next plan: back in rotation first.
    controller.ok(&["server", "fe2", "lb", "ready"]);

    // Now every front-end installs the build and restarts on it, one group at a time, then
    // each balancer in turn. lb2 cannot write beside its executable: past the point of no
    // return, the operation pauses there, with lb1 on the build and the controller not yet.
    let blocker = balancers[1].own_exe().with_file_name(format!(
        ".paddock-upgrade-{}-{}",
        &sha[..12],
        lb_pids[1]
    ));
    std::fs::create_dir(&blocker).unwrap();
    // Each wait within 20 s: a balancer told the build must hear the new generation at once
    // (a long-poll not woken for it answers only after 25 s).
    let out = controller
        .cli_async(&[
            "upgrade",
            &new.display().to_string(),
            "--timeout",
            "20s",
            "--watch",
            "1s",
        ])
        .await;
    assert!(!out.success, "{}", out.stdout);
    // Uploaded before: not sent again.
    assert!(
        out.stdout.contains("already kept by the controller"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("paused")
            && out.stderr.contains("balancer lb2 cannot install build")
            && out.stderr.contains("cannot write"),
        "{}",
        out.stderr
    );
    assert!(is_new_build(Path::new(&format!(
        "/proc/{}/exe",
        lb_pids[0]
    ))));
    assert!(!is_new_build(&balancers[1].own_exe()));
    assert!(!is_new_build(&controller.own_exe()));
    std::fs::remove_dir(&blocker).unwrap();
    let op: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let id = op[0]["id"].to_string();
    assert_eq!(op[0]["state"], "paused", "{:#}", op[0]);
    controller.ok(&["op", "resume", &id]);
    let out = controller.cli_async(&["op", "watch", &id]).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples = load.stop().await;
    assert!(samples.len() > 100, "too little load: {}", samples.len());
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    // At most the one connection of each client that lb1 closed as it restarted.
    let retried = samples.iter().filter(|s| s.retried).count();
    assert!(retried <= 4, "{retried} requests sent again");

    // Each kept its listening socket (the system chose the ports): connections that arrived
    // while it restarted waited for the new process.
    let after: Vec<serde_json::Value> = servers(&controller)
        .iter()
        .map(|s| s["address"].clone())
        .collect();
    assert_eq!(after, addresses);
    for s in servers(&controller) {
        assert_eq!(s["observed"]["build"], sha.as_str(), "{s:#}");
        assert_eq!(s["platform_target"], sha.as_str(), "{s:#}");
        assert_eq!(s["lb"], "ready", "{s:#}");
        assert_eq!(s["scheduler"], true, "{s:#}");
    }
    let old_size = std::fs::metadata(PADDOCK).unwrap().len();
    let kept = |exe: &Path| {
        let previous = exe.with_file_name("paddock.previous");
        std::fs::metadata(&previous).unwrap().len() == old_size && !is_new_build(&previous)
    };
    for (frontend, pid) in frontends.iter().zip(&pids) {
        assert!(
            is_new_build(&frontend.own_exe()),
            "{}'s executable is not the new build",
            frontend.name
        );
        assert!(
            kept(&frontend.own_exe()),
            "{} kept no way back",
            frontend.name
        );
        // The same process, now running the new executable.
        assert_eq!(frontend.pid(), *pid);
        let running = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            running,
            frontend.own_exe(),
            "{} runs {}",
            frontend.name,
            running.display()
        );
        assert!(
            frontend
                .log()
                .contains("platform build installed; restarting on it"),
            "{}",
            frontend.log()
        );
    }
    let op: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let newest = &op.as_array().unwrap()[0];
    assert_eq!(newest["kind"], "platform-upgrade");
    assert_eq!(newest["state"], "succeeded");

    // Each balancer restarted in place on the new build: same process, its own executable
    // replaced (the old one kept), one after the other.
    for (lb, pid) in balancers.iter().zip(&lb_pids) {
        assert_eq!(lb.pid(), Some(*pid));
        assert!(is_new_build(&lb.own_exe()), "{}", lb.name);
        assert!(kept(&lb.own_exe()), "{} kept no way back", lb.name);
        assert!(is_new_build(Path::new(&format!("/proc/{pid}/exe"))));
    }
    let routing: serde_json::Value =
        serde_json::from_str(&controller.ok(&["routing", "--json"])).unwrap();
    for b in routing["balancers"].as_array().unwrap() {
        assert_eq!(b["report"]["build"], sha.as_str(), "{b:#}");
        assert_eq!(b["platform_target"], sha.as_str(), "{b:#}");
    }
    let human = controller.ok(&["routing"]);
    let lines: Vec<&str> = human.lines().filter(|l| l.starts_with("lb")).collect();
    assert_eq!(lines.len(), 2, "{human}");
    for line in lines {
        assert!(line.ends_with(&sha[..12]), "{human}");
    }
    // Users' answers were watched for a second after the cutover to the new build.
    let watch = op_step(newest, "watch");
    assert_eq!(watch["state"], "done", "{newest:#}");
    let facts = watch["facts"].to_string();
    assert!(
        facts.contains("hello v1: ") && facts.contains(", 0 failed (5xx; at most 1% may)"),
        "{facts}"
    );
    let step = op_step(newest, "upgrade-balancers");
    assert_eq!(step["state"], "done", "{newest:#}");
    let facts: Vec<&str> = step["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(facts[0].starts_with("lb1 runs build"), "{facts:?}");
    assert!(facts[1].starts_with("lb2 told to run build"), "{facts:?}");
    assert!(facts[2].starts_with("lb2 runs build"), "{facts:?}");

    // The controller went last: same process, same address, the new build, and it finished
    // the operation it was driving when it restarted.
    assert_eq!(controller.pid(), controller_pid);
    assert!(is_new_build(&controller.own_exe()));
    assert!(kept(&controller.own_exe()));
    assert_eq!(
        std::fs::read_link(format!("/proc/{controller_pid}/exe")).unwrap(),
        controller.own_exe()
    );
    let log = controller.log();
    assert!(
        log.contains("platform build installed; restarting on it"),
        "{log}"
    );
    assert!(
        log.contains("listening on the socket the previous process handed over"),
        "{log}"
    );
    let last = newest["steps"].as_array().unwrap().last().unwrap();
    assert_eq!(last["step"], "upgrade-controller", "{newest:#}");
    assert_eq!(last["state"], "done", "{newest:#}");
    assert!(
        last["facts"][0]
            .as_str()
            .unwrap()
            .contains(&format!("as process {controller_pid}")),
        "{last:#}"
    );

    // Nothing is left to do.
    let e = controller.fails(&["upgrade", &sha]);
    assert!(e.contains("already runs build"), "{e}");
    // The build stays while servers are told to run it (one that comes back installs it).
    let e = controller.fails(&["platform", "remove", &sha]);
    assert!(e.contains("told to run build"), "{e}");
    let e = controller.fails(&["platform", "remove", &"0".repeat(64)]);
    assert!(e.contains("no platform build"), "{e}");
    let human = controller.ok(&["servers"]);
    assert_eq!(
        human.matches(&format!("0.1.0 {}", &sha[..12])).count(),
        3,
        "{human}"
    );
}

/// A zone with one serving front-end is upgraded in place: connections that arrive while it
/// restarts wait in its handed-over socket, so users still see no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_front_end_restarts_in_place_without_failing_a_request() {
    let mut controller =
        Controller::start_own_executable(Db::Sqlite, "upgrade_in_place", &["--platform-upgrades"])
            .await;
    let frontend = Frontend::builder("solo")
        .controller(&controller, "default")
        .own_executable()
        .start()
        .await;
    let lb = Balancer::start_own_executable(&controller, "lb1", &[]).await;
    lb.wait_up(&["solo"], true).await;
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    // A standby controller that follows the active one's builds.
    let standby = controller.start_standby_following("ctl-b").await;
    let standby_pid = standby.pid();

    let dir = tempfile::tempdir().unwrap();
    let new = new_build(&dir.path().join("paddock"));
    // A controller started without --platform-upgrades takes no build.
    let plain = Controller::start(Db::Sqlite, "upgrade_off", &[]).await;
    let e = plain.fails(&["upgrade", &new.display().to_string()]);
    assert!(e.contains("start it with --platform-upgrades"), "{e}");
    drop(plain);
    let plan = controller.ok(&["upgrade", &new.display().to_string(), "--plan"]);
    assert!(plan.contains("restarts in place"), "{plan}");
    assert!(plan.contains("upgrade-in-place"), "{plan}");

    // One zone's front-ends (`--zone`), not the controller.
    let load = Load::start(lb.addr, "/hello", 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = controller
        .cli_async(&["upgrade", &new.display().to_string(), "--zone", "default"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    assert!(!out.stdout.contains("upgrade-controller"), "{}", out.stdout);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples = load.stop().await;
    assert!(samples.len() > 100, "too little load: {}", samples.len());
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    assert!(is_new_build(&frontend.own_exe()));
    assert!(!is_new_build(&controller.own_exe()));
    assert!(!is_new_build(&lb.own_exe()));
    let s = &servers(&controller)[0];
    assert_eq!(s["observed"]["build"], s["platform_target"], "{s:#}");
    assert_eq!(s["lb"], "ready", "{s:#}");

    assert!(!is_new_build(&standby.own_exe()));
    let standbys: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/standbys").await).unwrap();
    assert_eq!(standbys[0]["report"]["name"], "ctl-b", "{standbys:#}");
    assert_eq!(standbys[0]["report"]["pid"], standby_pid, "{standbys:#}");
    let human = controller.ok(&["standbys"]);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("ctl-b") && l.contains(&standby_pid.to_string())),
        "{human}"
    );

    // Then the balancers', the standby's and the controller's turn alone. The standby restarts
    // on the build, still standing by, before the controller does.
    let sha = s["platform_target"].as_str().unwrap().to_string();
    let out = controller.cli_async(&["upgrade", &sha]).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("upgrade-balancers"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("ctl-b told to run build {}", &sha[..12])),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("upgrade-controller"), "{}", out.stdout);
    assert!(!out.stdout.contains("upgrade-in-place"), "{}", out.stdout);
    assert!(is_new_build(&controller.own_exe()));
    assert!(is_new_build(&lb.own_exe()));
    let op: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let step = op_step(&op[0], "upgrade-standbys").clone();
    assert_eq!(step["state"], "done", "{step:#}");
    assert!(
        step["facts"][1]
            .as_str()
            .unwrap()
            .contains(&format!("ctl-b on {}", harness::host())),
        "{step:#}"
    );
    // The same process, on the new executable (the old one kept).
    assert_eq!(standby.pid(), standby_pid);
    assert!(is_new_build(&standby.own_exe()));
    assert!(is_new_build(Path::new(&format!("/proc/{standby_pid}/exe"))));
    // Listed by the restarted controller once the standby reported to it (every second).
    let listed = || {
        controller
            .ok(&["standbys"])
            .lines()
            .any(|l| l.starts_with("ctl-b") && l.ends_with(&sha[..12]))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listed() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            controller.ok(&["standbys"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        standby.log().contains("restarting on it, standing by"),
        "{}",
        standby.log()
    );
    let e = controller.fails(&["upgrade", &sha]);
    assert!(
        e.contains("every front-end, balancer and controller already"),
        "{e}"
    );

    // The active controller dies: the standby takes over, on the farm's release.
    controller.kill();
    standby
        .wait_for_log("listening on http://", Duration::from_secs(30))
        .await;
    let e = standby.fails(&["upgrade", &sha]);
    assert!(e.contains("already runs build"), "{e}");
    assert_eq!(servers(&standby)[0]["observed"]["build"], sha.as_str());
    // It has the build's record, not its file: an upload sends it.
    let out = standby.ok(&["platform", "upload", &new.display().to_string()]);
    assert!(
        out.contains("kept by the controller") && !out.contains("already"),
        "{out}"
    );
    let out = standby.ok(&["platform", "upload", &new.display().to_string()]);
    assert!(out.contains("already kept by the controller"), "{out}");
}

/// A balancer that installed a build but cannot restart on it (its certificate and key no
/// longer go together, a renewal half done) says so at once: the step fails naming the files,
/// the balancer routes on, on its old build, and reports no installation running. Once the
/// files are mended, `paddock op resume` restarts it on the build and the upgrade ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_that_cannot_restart_on_a_build_says_why_and_routes_on() {
    let controller = Controller::start_own_executable(
        Db::Sqlite,
        "upgrade_lb_refuses",
        &["--platform-upgrades"],
    )
    .await;
    let _frontend = Frontend::builder("solo")
        .controller(&controller, "default")
        .own_executable()
        .start()
        .await;
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::copy(tls_fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("key.pem"), &key).unwrap();
    let lb = Balancer::start_own_executable(
        &controller,
        "lb1",
        &[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ],
    )
    .await;
    lb.wait_up(&["solo"], true).await;
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    let pid = lb.pid().unwrap();
    // Answers over HTTPS, from the version published.
    let get_hello = || async {
        let mut stream = tls_connect(lb.addr, Some(&tls_fixture("ca.pem")))
            .await
            .unwrap();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = get_hello().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    std::fs::copy(tls_fixture("other-key.pem"), &key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let new = new_build(&dir.path().join("paddock"));
    let out = controller
        .cli_async(&["upgrade", &new.display().to_string(), "--timeout", "60s"])
        .await;
    assert!(!out.success, "{}", out.stdout);
    // Told at once (not at the step's timeout), with what to mend.
    assert!(
        out.stderr.contains("paused")
            && out.stderr.contains("balancer lb1 cannot install build")
            && out.stderr.contains("installed, not restarting on it")
            && out
                .stderr
                .contains(&format!("the TLS key {}", key.display())),
        "{}",
        out.stderr
    );
    assert!(is_new_build(&lb.own_exe()));
    assert_eq!(lb.pid(), Some(pid));
    assert!(!is_new_build(Path::new(&format!("/proc/{pid}/exe"))));
    let answer = get_hello().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let routing: serde_json::Value =
        serde_json::from_str(&controller.ok(&["routing", "--json"])).unwrap();
    let report = &routing["balancers"][0]["report"];
    assert!(report["installing"].is_null(), "{report:#}");
    assert!(
        report["upgrade_error"]["error"]
            .as_str()
            .unwrap()
            .contains("not restarting on it"),
        "{report:#}"
    );
    assert_ne!(
        report["build"], report["upgrade_error"]["build"],
        "{report:#}"
    );

    // Mended: resumed, the balancer restarts on the build, and the controller after it.
    std::fs::copy(tls_fixture("key.pem"), &key).unwrap();
    let op: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let id = op[0]["id"].to_string();
    controller.ok(&["op", "resume", &id]);
    let out = controller.cli_async(&["op", "watch", &id]).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    assert_eq!(lb.pid(), Some(pid));
    assert!(is_new_build(Path::new(&format!("/proc/{pid}/exe"))));
    assert!(is_new_build(&controller.own_exe()));
    let answer = get_hello().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A build that installs on a front-end but does not come up there (here its data folder can
/// no longer be opened, so the new process stops at start): the step fails once the server is
/// silent for longer than a restart takes, not at the operation's timeout, naming it, and users,
/// who were on the loaded group all along, stay there without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_does_not_come_up_on_a_front_end_fails_the_step_and_users_stay() {
    let controller =
        Controller::start_own_executable(Db::Sqlite, "upgrade_no_start", &["--platform-upgrades"])
            .await;
    let mut frontends = Vec::new();
    for name in ["fe1", "fe2"] {
        frontends.push(
            Frontend::builder(name)
                .controller(&controller, "default")
                .own_executable()
                .start()
                .await,
        );
    }
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1", "fe2"], true).await;
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    // fe1's artifact cache becomes a file: the process running now serves from memory, a new
    // one cannot start.
    let artifacts = frontends[0].data_dir().join("artifacts");
    std::fs::rename(&artifacts, artifacts.with_extension("moved")).unwrap();
    std::fs::write(&artifacts, b"not a folder").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let new = new_build(&dir.path().join("paddock"));
    let load = Load::start(lb.addr, "/hello", 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let out = controller
        .cli_async(&[
            "upgrade",
            &new.display().to_string(),
            "--updating",
            "fe1",
            "--timeout",
            "110s",
        ])
        .await;
    let took = started.elapsed();
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("fe1 stopped reporting after it was told to run build")
            && out.stderr.contains("paddock.previous"),
        "{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(100), "failed after {took:?}");
    assert!(
        frontends[0].log().contains("opening the artifact cache"),
        "{}",
        frontends[0].log()
    );
    let samples = load.stop().await;
    assert!(samples.len() > 100, "too little load: {}", samples.len());
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    let op: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    assert_eq!(op[0]["state"], "failed", "{:#}", op[0]);
    // fe2 was never told the build, and routes on.
    assert!(!is_new_build(&frontends[1].own_exe()));
    let fe2 = servers(&controller)
        .into_iter()
        .find(|s| s["name"] == "fe2")
        .unwrap();
    assert_eq!(fe2["lb"], "ready", "{fe2:#}");
}
