//! Balanced deployment end to end: a real controller, four front-ends and a balancer on
//! loopback, keep-alive clients through the balancer for the whole operation, driven through the
//! CLI (`paddock deploy --balanced`, `paddock op ...`).

mod harness;

use std::time::{Duration, Instant};

use harness::{
    Balancer, Controller, Db, Frontend, Load, Sample, failures, fixture, op_step, ran_ms,
};

const CLIENTS: usize = 6;
const PACE: Duration = Duration::from_millis(5);

struct Farm {
    controller: Controller,
    frontends: Vec<Frontend>,
    lb: Balancer,
}

/// A controller, front-ends `fe1..feN` in zone default, a balancer; hello@v1 and slow published,
/// hello@v2 and the broken hello uploaded.
async fn farm(test: &str, db: Db, n: usize) -> Farm {
    let controller = Controller::start(db, test, &[]).await;
    let mut frontends = Vec::new();
    for i in 1..=n {
        frontends.push(
            Frontend::builder(&format!("fe{i}"))
                .controller(&controller, "default")
                .start()
                .await,
        );
    }
    let names: Vec<String> = (1..=n).map(|i| format!("fe{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&names, true).await;
    for package in ["hello-v1", "slow"] {
        controller.ok(&["app", "publish", &fixture(package).display().to_string()]);
    }
    for package in ["hello-v2", "hello-broken"] {
        controller.ok(&["app", "upload", &fixture(package).display().to_string()]);
    }
    Farm {
        controller,
        frontends,
        lb,
    }
}

fn op_json(controller: &Controller, id: i64) -> serde_json::Value {
    serde_json::from_str(&controller.ok(&["op", "show", &id.to_string(), "--json"])).unwrap()
}

fn servers_json(controller: &Controller) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&controller.ok(&["servers", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Every server's (name, lb, deployment, scheduler).
fn flags(controller: &Controller) -> Vec<(String, String, bool, bool)> {
    servers_json(controller)
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["lb"].as_str().unwrap().to_string(),
                s["deployment"].as_bool().unwrap(),
                s["scheduler"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn desired(controller: &Controller, app: &str) -> String {
    let apps: serde_json::Value =
        serde_json::from_str(&controller.ok(&["app", "list", "--json"])).unwrap();
    apps.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == app)
        .unwrap()["desired"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The versions one client saw, with runs collapsed: `["v1", "v2"]`.
fn runs(samples: &[Sample]) -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for s in samples {
        let v = s.version.clone().unwrap_or_default();
        if runs.last() != Some(&v) {
            runs.push(v);
        }
    }
    runs
}

/// Stops `load` and checks that no request failed and that each client saw v1, then v2, and
/// never v1 again; all the samples.
async fn each_client_moved_once(load: Load) -> Vec<Sample> {
    let clients = load.stop_by_client().await;
    let all: Vec<Sample> = clients.iter().flatten().cloned().collect();
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    for (i, client) in clients.iter().enumerate() {
        assert_eq!(
            runs(client),
            ["v1", "v2"],
            "client {i} saw {:?}",
            runs(client)
        );
    }
    all
}

/// Polls `op show` until the operation is at `step` in state `running`.
async fn wait_for_step(controller: &Controller, id: i64, step: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let op = op_json(controller, id);
        if op["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == step && s["state"] == "running")
        {
            return op;
        }
        assert!(
            op["state"] == "running" && Instant::now() < deadline,
            "operation {id} never ran step {step}: {op:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The id of the operation a `deploy --balanced --detach --json` started.
fn started_id(out: &harness::CliOutput) -> i64 {
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_i64()
        .unwrap()
}

const FORWARD: [&str; 10] = [
    "scheduler-off",
    "drain-updating",
    "deployment-off",
    "load-new",
    "smoke",
    "cutover",
    "scheduler-on-updating",
    "deployment-on",
    "route-all",
    "scheduler-on-loaded",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_deployment_moves_every_client_once_with_zero_failures() {
    let f = farm("deploy_balanced", Db::Sqlite, 4).await;
    let before = flags(&f.controller);

    // The plan names the real servers and changes nothing.
    let generation = |c: &Controller| -> i64 {
        serde_json::from_str::<serde_json::Value>(&c.ok(&["routing", "--json"])).unwrap()["table"]
            ["generation"]
            .as_i64()
            .unwrap()
    };
    let g = generation(&f.controller);
    let plan = f
        .controller
        .ok(&["deploy", "--balanced", "hello@v2", "--plan"]);
    assert!(plan.contains("hello v1 → v2"), "{plan}");
    assert!(plan.contains("updating: fe1, fe2"), "{plan}");
    assert!(plan.contains("loaded:   fe3, fe4"), "{plan}");
    for step in FORWARD {
        assert!(plan.contains(step), "{plan}");
    }
    assert_eq!(generation(&f.controller), g, "--plan changed something");
    // Bad input changes nothing either.
    let e = f.controller.fails(&["deploy", "--balanced", "hello@v9"]);
    assert!(e.contains("unknown app version hello@v9"), "{e}");
    let e = f.controller.fails(&[
        "deploy",
        "--balanced",
        "hello@v2",
        "--updating",
        "fe1,fe2,fe3,fe4",
    ]);
    assert!(e.contains("leave at least one"), "{e}");
    let e = f.controller.fails(&["deploy", "--balanced", "hello@v1"]);
    assert!(e.contains("already runs hello@v1"), "{e}");
    assert_eq!(generation(&f.controller), g);

    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = f
        .controller
        .cli_async(&["deploy", "--balanced", "hello@v2"])
        .await;
    let returned = Instant::now();
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    // Requests that start after the command returned all get v2.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = each_client_moved_once(load).await;
    assert!(all.len() > 100, "too little load: {}", all.len());
    assert!(
        all.iter()
            .filter(|s| s.started > returned)
            .all(|s| s.version.as_deref() == Some("v2"))
    );
    // The updating group served v2 from the cutover; the loaded group v1 until then, and v2
    // once back in rotation.
    let v2_servers: std::collections::BTreeSet<_> = all
        .iter()
        .filter(|s| s.version.as_deref() == Some("v2"))
        .filter_map(|s| s.server.clone())
        .collect();
    assert!(v2_servers.contains("fe1") && v2_servers.contains("fe2"));

    // The journal: every step, in order, with timings and the facts it waited for.
    let ops: serde_json::Value =
        serde_json::from_str(&f.controller.ok(&["op", "list", "--json"])).unwrap();
    let id = ops[0]["id"].as_i64().unwrap();
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let steps = op["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, FORWARD);
    for s in steps {
        assert_eq!(s["state"], "done", "{s:#}");
        assert!(s["ended_ms"].as_i64().unwrap() >= s["started_ms"].as_i64().unwrap());
        assert!(!s["facts"].as_array().unwrap().is_empty(), "{s:#}");
    }
    let drain = &steps[1]["facts"];
    assert!(
        drain.to_string().contains("acknowledged by lb1")
            && drain.to_string().contains("fe1, fe2 drained"),
        "{drain}"
    );
    let smoke = steps[4]["facts"].to_string();
    assert!(
        smoke.contains("fe1: GET /hello/health → 200 with hello@v2"),
        "{smoke}"
    );
    let human = f.controller.ok(&["op", "show", &id.to_string()]);
    eprintln!("{human}");
    assert!(
        human.contains("succeeded") && human.contains("cutover"),
        "{human}"
    );

    // Afterwards: every server serves v2, flags and routing exactly as before.
    for fe in &f.frontends {
        fe.wait_serving("hello", "v2", "/hello").await;
    }
    assert_eq!(flags(&f.controller), before);
    assert_eq!(desired(&f.controller, "hello"), "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_its_smoke_test_never_reaches_a_user() {
    let f = farm("deploy_smoke_fails", Db::Sqlite, 4).await;
    let before = flags(&f.controller);
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = f
        .controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "hello@v3-broken",
            "--detach",
            "--json",
        ])
        .await;
    let id = started_id(&out);
    // One operation per zone: a second one, and manual changes to the zone, are refused.
    let e = f.controller.fails(&["deploy", "--balanced", "hello@v2"]);
    assert!(
        e.contains(&format!("operation {id} is running in zone default")),
        "{e}"
    );
    let e = f.controller.fails(&["deploy", "hello@v2"]);
    assert!(e.contains(&format!("operation {id} is running")), "{e}");
    let e = f.controller.fails(&["server", "fe3", "lb", "drain"]);
    assert!(e.contains(&format!("operation {id} is running")), "{e}");
    let e = f
        .controller
        .fails(&["zone", "default", "policy", "least-connections"]);
    assert!(e.contains(&format!("operation {id} is running")), "{e}");
    let e = f
        .controller
        .fails(&["config", "set", "hello", "colour", "blue"]);
    assert!(e.contains(&format!("operation {id} is running")), "{e}");

    let out = f
        .controller
        .cli_async(&["op", "watch", &id.to_string()])
        .await;
    assert!(!out.success, "the operation should fail: {}", out.stdout);
    assert!(
        out.stderr.contains(&format!("operation {id} failed")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("smoke test failed"), "{}", out.stderr);
    assert!(out.stderr.contains("500"), "{}", out.stderr);
    assert!(out.stdout.contains("restore-routing"), "{}", out.stdout);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let clients = load.stop_by_client().await;

    let all: Vec<Sample> = clients.iter().flatten().cloned().collect();
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    assert!(
        all.iter().all(|s| s.version.as_deref() == Some("v1")),
        "a user saw something else than v1: {:?}",
        all.iter()
            .filter_map(|s| s.version.clone())
            .collect::<std::collections::BTreeSet<_>>()
    );

    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "failed");
    let names: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "scheduler-off",
            "drain-updating",
            "deployment-off",
            "load-new",
            "smoke",
            "restore-routing",
            "restore-version",
            "restore-flags"
        ]
    );
    // Exactly as before: versions, flags, routing; and the updating group serves v1 again.
    assert_eq!(desired(&f.controller, "hello"), "v1");
    assert_eq!(flags(&f.controller), before);
    for fe in &f.frontends {
        fe.wait_serving("hello", "v1", "/hello").await;
    }
    // The zone is free again.
    f.controller
        .ok(&["deploy", "--balanced", "hello@v2", "--plan"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_under_users_is_seen_by_the_watch_and_users_go_back() {
    let f = farm("deploy_watch", Db::Sqlite, 2).await;
    f.controller.ok(&[
        "app",
        "upload",
        &fixture("hello-v3-failing").display().to_string(),
    ]);
    let before = flags(&f.controller);

    // The plan has a watch step after the cutover, and says what it judges by.
    let plan = f.controller.ok(&[
        "deploy",
        "--balanced",
        "hello@v2",
        "--watch",
        "2s",
        "--max-failed",
        "0.5%",
        "--plan",
    ]);
    assert!(
        plan.contains("6. cutover") && plan.contains("7. watch"),
        "{plan}"
    );
    assert!(
        plan.contains("counts users' answers for 2 s; more than 0.5% failed")
            && plan.contains("a failure before step 9 (deployment-on) puts everything back"),
        "{plan}"
    );
    // Bad input changes nothing.
    let e = f.controller.fails(&[
        "deploy",
        "--balanced",
        "hello@v2",
        "--watch",
        "2s",
        "--max-failed",
        "150%",
    ]);
    assert!(e.contains("a share from 0% to 100%"), "{e}");
    let e = f.controller.fails(&["deploy", "hello@v2", "--watch", "2s"]);
    assert!(e.contains("add --balanced"), "{e}");
    let e = f
        .controller
        .fails(&["deploy", "--balanced", "hello@v2", "--max-failed", "1%"]);
    assert!(e.contains("--watch"), "{e}");
    assert_eq!(desired(&f.controller, "hello"), "v1");

    // A version that passes its smoke test and fails users' requests: the watch sees it
    // before its time is up, and users go back to v1.
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let window = 30;
    let out = f
        .controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "hello@v3-failing",
            "--watch",
            &format!("{window}s"),
        ])
        .await;
    let returned = Instant::now();
    assert!(!out.success, "the watch should fail it: {}", out.stdout);
    assert!(
        out.stderr.contains("hello v3-failing:")
            && out.stderr.contains("answers through lb1 failed (5xx)")
            && out
                .stderr
                .contains("more than the 1% allowed: users go back to v1"),
        "{}",
        out.stderr
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = load.stop().await;
    // Users saw the failing version only between the cutover and the watch's verdict, and
    // only v1 once the operation had put everything back.
    let failed: Vec<&Sample> = all.iter().filter(|s| s.status != 200).collect();
    assert!(!failed.is_empty(), "no request reached v3-failing");
    assert!(
        failed
            .iter()
            .all(|s| s.status == 500 && s.version.as_deref() == Some("v3-failing")),
        "{:?}",
        failures(&all)
    );
    let after: Vec<&Sample> = all.iter().filter(|s| s.started > returned).collect();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|s| s.status == 200 && s.version.as_deref() == Some("v1")),
        "{:?}",
        failures(&all)
    );
    let id = serde_json::from_str::<serde_json::Value>(&f.controller.ok(&["op", "list", "--json"]))
        .unwrap()[0]["id"]
        .as_i64()
        .unwrap();
    eprintln!("{}", f.controller.ok(&["op", "show", &id.to_string()]));
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "failed", "{op:#}");
    let steps = op["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "scheduler-off",
            "drain-updating",
            "deployment-off",
            "load-new",
            "smoke",
            "cutover",
            "watch",
            "restore-routing",
            "restore-version",
            "restore-flags"
        ]
    );
    let watch = &steps[6];
    assert_eq!(watch["state"], "failed");
    let watched_ms = ran_ms(watch);
    assert!(
        watched_ms < window * 1000,
        "the watch waited out its {window} s ({watched_ms} ms) instead of failing on the evidence"
    );
    assert_eq!(desired(&f.controller, "hello"), "v1");
    assert_eq!(flags(&f.controller), before);
    // `paddock routing` shows them with the route, once the balancer reported them all (it
    // reports every second).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routing = f.controller.ok(&["routing"]);
        if routing.lines().any(|l| {
            l.starts_with("route /hello") && l.ends_with(&format!(" {} failed (5xx)", failed.len()))
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "{routing}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The balancer counted each of them, as its metrics show.
    assert_eq!(
        f.lb.metric_sum("paddock_balancer_failed_requests_total", &["app=\"hello\""])
            .await,
        failed.len() as u64
    );

    // A version that answers well passes the watch, which journals what it counted.
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    let out = f
        .controller
        .cli_async(&["deploy", "--balanced", "hello@v2", "--watch", "2s"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let all = load.stop().await;
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    let id = serde_json::from_str::<serde_json::Value>(&f.controller.ok(&["op", "list", "--json"]))
        .unwrap()[0]["id"]
        .as_i64()
        .unwrap();
    eprintln!("{}", f.controller.ok(&["op", "show", &id.to_string()]));
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let watch = op_step(&op, "watch");
    let facts = watch["facts"].to_string();
    assert!(
        facts.contains("hello v2: ")
            && facts.contains("answers through lb1 since the cutover")
            && facts.contains(", 0 failed (5xx; at most 1% may)"),
        "{facts}"
    );
    let watched_ms = ran_ms(watch);
    assert!(watched_ms >= 2000, "watched {watched_ms} ms");
    assert_eq!(desired(&f.controller, "hello"), "v2");

    // An operator who aborts during the watch puts users back at once, without a failure,
    // instead of waiting out its time.
    let before = flags(&f.controller);
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    let out = f
        .controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "hello@v1",
            "--watch",
            "60s",
            "--detach",
            "--json",
        ])
        .await;
    let id = started_id(&out);
    wait_for_step(&f.controller, id, "watch").await;
    let out = f
        .controller
        .cli_async(&["op", "abort", &id.to_string()])
        .await;
    assert!(
        !out.success && out.stderr.contains(&format!("operation {id} aborted")),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let all = load.stop().await;
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "aborted", "{op:#}");
    let watch = op_step(&op, "watch");
    assert_eq!(watch["state"], "failed", "{watch:#}");
    assert!(
        watch
            .to_string()
            .contains("aborted by the operator while watching"),
        "{watch:#}"
    );
    let watched_ms = ran_ms(watch);
    assert!(watched_ms < 30_000, "the abort waited {watched_ms} ms");
    assert_eq!(desired(&f.controller, "hello"), "v2");
    assert_eq!(flags(&f.controller), before);
    let mut conn = f.lb.connect().await;
    assert_eq!(conn.get("/hello").await.unwrap().version(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_during_the_watch_watches_again_and_finishes() {
    let mut f = farm("deploy_watch_resume", Db::Sqlite, 2).await;
    let before = flags(&f.controller);
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    let out = f
        .controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "hello@v2",
            "--watch",
            "5s",
            "--detach",
            "--json",
        ])
        .await;
    let id = started_id(&out);
    wait_for_step(&f.controller, id, "watch").await;
    // Users are on v2 when the controller dies: they stay there, the restarted controller
    // watches the whole time again (its counts were in the memory of the one that died), then
    // finishes the deployment.
    f.controller.kill();
    f.controller.restart().await;
    let out = f
        .controller
        .cli_async(&["op", "watch", &id.to_string()])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let watch = op_step(&op, "watch");
    assert_eq!(watch["attempts"], 2, "{watch:#}");
    let facts = watch["facts"].to_string();
    assert!(
        facts.contains("answers through lb1 since the cutover") && facts.contains(", 0 failed"),
        "{facts}"
    );
    // The journal keeps the step's first start; the fact says what the last attempt watched.
    let watched: f64 = facts
        .split(" s watched)")
        .next()
        .and_then(|before| before.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no watched time in {facts}"));
    assert!(watched >= 5.0, "watched {watched} s after the restart");
    each_client_moved_once(load).await;
    assert_eq!(desired(&f.controller, "hello"), "v2");
    assert_eq!(flags(&f.controller), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_during_the_drain_resumes_and_an_abort_after_the_cutover_flips_back() {
    let mut f = farm("deploy_resume", Db::Postgres, 4).await;
    let before = flags(&f.controller);
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A slow request on fe1 (updating) keeps the drain step waiting while the controller dies.
    let mut fe1 = f.frontends[0].connect().await;
    let slow = tokio::spawn(async move { fe1.get("/slow?ms=4000").await.unwrap() });
    let out = f
        .controller
        .cli_async(&["deploy", "--balanced", "hello@v2", "--detach", "--json"])
        .await;
    let id = started_id(&out);
    wait_for_step(&f.controller, id, "drain-updating").await;
    // A server of the zone registering again into another zone is held off meanwhile: it would
    // leave the plan unseen.
    let moved = reqwest::Client::new()
        .post(format!("{}/control/v1/register", f.controller.url))
        .bearer_auth(&f.controller.join_token)
        .json(
            &serde_json::json!({"name": "fe3", "zone": "eu", "address": "127.0.0.1:1",
            "platform_version": "0", "engine": "0"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 409);
    let error: serde_json::Value = moved.json().await.unwrap();
    assert!(
        error["message"].as_str().unwrap().contains(&format!(
            "fe3 moves from zone default to eu while operation {id} holds zone default"
        )),
        "{error}"
    );
    f.controller.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.controller.restart().await;
    let out = f
        .controller
        .cli_async(&["op", "watch", &id.to_string()])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(slow.await.unwrap().status, 200);
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let drain = op_step(&op, "drain-updating");
    assert_eq!(
        drain["attempts"], 2,
        "the restarted controller ran the drain again: {drain:#}"
    );
    let names: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(names, FORWARD);
    tokio::time::sleep(Duration::from_millis(200)).await;
    each_client_moved_once(load).await;
    assert_eq!(flags(&f.controller), before);

    // Back to v1, aborted while the cutover waits for fe3 (loaded) to drain: users return to
    // the loaded group at once, which never left v2.
    let load = Load::start(f.lb.addr, "/hello", CLIENTS, PACE);
    let mut fe3 = f.frontends[2].connect().await;
    let slow = tokio::spawn(async move { fe3.get("/slow?ms=8000").await.unwrap() });
    let out = f
        .controller
        .cli_async(&["deploy", "--balanced", "hello@v1", "--detach", "--json"])
        .await;
    let id = started_id(&out);
    wait_for_step(&f.controller, id, "cutover").await;
    // Users are on the updating group (v1) now.
    let mut conn = f.lb.connect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.get("/hello").await.unwrap().version() != Some("v1") {
        assert!(Instant::now() < deadline, "the cutover did not move users");
    }
    let out = f
        .controller
        .cli_async(&["op", "abort", &id.to_string()])
        .await;
    assert!(!out.success, "an aborted operation exits non-zero");
    assert!(
        out.stderr.contains(&format!("operation {id} aborted")),
        "{}",
        out.stderr
    );
    assert_eq!(
        conn.get("/hello").await.unwrap().version(),
        Some("v2"),
        "after the abort users are back on the old version"
    );
    let op = op_json(&f.controller, id);
    assert_eq!(op["state"], "aborted", "{op:#}");
    let e = f.controller.fails(&["op", "abort", &id.to_string()]);
    assert!(e.contains("only a running operation can be aborted"), "{e}");
    let e = f.controller.fails(&["op", "resume", &id.to_string()]);
    assert!(e.contains("ended aborted"), "{e}");
    let e = f.controller.fails(&["op", "show", "999"]);
    assert!(e.contains("unknown operation 999"), "{e}");
    slow.abort();
    let clients = load.stop_by_client().await;
    let all: Vec<Sample> = clients.iter().flatten().cloned().collect();
    assert!(failures(&all).is_empty(), "{:?}", failures(&all));
    assert_eq!(desired(&f.controller, "hello"), "v2");
    assert_eq!(flags(&f.controller), before);
    for fe in &f.frontends {
        fe.wait_serving("hello", "v2", "/hello").await;
    }
}

/// A step past the cutover that fails pauses the operation (it can only go forward): the loaded
/// group's fe2 cannot load the new version, whose artifact was damaged in the store while the
/// cutover waited. Abort and manual changes are refused saying what to do; once the artifact is
/// sound again and fe2 has loaded it, `op resume` finishes the operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_paused_past_its_cutover_says_what_to_do_and_resumes() {
    let f = farm("deploy_paused", Db::Sqlite, 2).await;
    // A slow request on fe2 (loaded) holds the cutover, which waits for fe2 to drain.
    let mut fe2 = f.frontends[1].connect().await;
    let slow = tokio::spawn(async move { fe2.get("/slow?ms=60000").await });
    let out = f
        .controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "hello@v2",
            "--updating",
            "fe1",
            "--timeout",
            "5s",
            "--detach",
            "--json",
        ])
        .await;
    let id = started_id(&out);
    wait_for_step(&f.controller, id, "cutover").await;
    let store = f.controller.store().await;
    store
        .execute_raw("UPDATE artifacts SET bytes = x'00'")
        .await
        .unwrap();
    // The slow request's client goes away: fe2 drains, and the operation goes on.
    slow.abort();

    let deadline = Instant::now() + Duration::from_secs(60);
    let op = loop {
        let op = op_json(&f.controller, id);
        if op["state"] != "running" {
            break op;
        }
        assert!(Instant::now() < deadline, "never paused: {op:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(op["state"], "paused", "{op:#}");
    let failed = op_step(&op, "deployment-on");
    assert_eq!(failed["state"], "failed", "{op:#}");
    assert!(
        failed["message"].as_str().unwrap().contains(
            "not confirmed within 5 s: fe2 cannot load hello@v2: artifact download damaged"
        ),
        "{op:#}"
    );
    let advice = format!("then `paddock op resume {id}`");
    let e = f.controller.fails(&["op", "abort", &id.to_string()]);
    assert!(
        e.contains("is paused past its cutover and cannot be aborted") && e.contains(&advice),
        "{e}"
    );
    let e = f.controller.fails(&["server", "fe2", "lb", "ready"]);
    assert!(
        e.contains(&format!(
            "operation {id} holds zone default and is paused past its cutover"
        )) && e.contains(&advice),
        "{e}"
    );

    // The repair: without a stored artifact the controller compiles the component again, and
    // fe2, which retries, loads it.
    store.execute_raw("DELETE FROM artifacts").await.unwrap();
    f.frontends[1].wait_serving("hello", "v2", "/hello").await;
    f.controller.ok(&["op", "resume", &id.to_string()]);
    let out = f
        .controller
        .cli_async(&["op", "watch", &id.to_string()])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(op_json(&f.controller, id)["state"], "succeeded");
    assert_eq!(desired(&f.controller, "hello"), "v2");
}

/// A copy of a fixture package under another name and zone, in `dir`.
fn package_as(dir: &std::path::Path, source: &str, name: &str, zone: &str) -> String {
    let to = dir.join(format!("{name}-{source}"));
    std::fs::create_dir_all(&to).unwrap();
    let from = fixture(source);
    let manifest = std::fs::read_to_string(from.join("paddock.toml")).unwrap();
    let manifest: String = manifest
        .lines()
        .filter(|l| !l.starts_with("name") && !l.starts_with("route") && !l.starts_with("smoke"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        to.join("paddock.toml"),
        format!("name = \"{name}\"\nzone = \"{zone}\"\nsmoke = \"/{name}/health\"\n{manifest}"),
    )
    .unwrap();
    std::fs::copy(from.join("hello.wasm"), to.join("hello.wasm")).unwrap();
    to.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_zone_has_its_own_groups_and_a_single_server_zone_deploys_in_place() {
    let controller = Controller::start(Db::Sqlite, "deploy_zones", &[]).await;
    let mut frontends = Vec::new();
    for (name, zone) in [
        ("a1", "a"),
        ("a2", "a"),
        ("b1", "b"),
        ("b2", "b"),
        ("c1", "c"),
    ] {
        frontends.push(
            Frontend::builder(name)
                .controller(&controller, zone)
                .start()
                .await,
        );
    }
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["a1", "a2", "b1", "b2", "c1"], true).await;
    let dir = tempfile::tempdir().unwrap();
    for (app, zone) in [("alpha", "a"), ("beta", "b"), ("gamma", "c")] {
        controller.ok(&[
            "app",
            "publish",
            &package_as(dir.path(), "hello-v1", app, zone),
        ]);
        controller.ok(&[
            "app",
            "upload",
            &package_as(dir.path(), "hello-v2", app, zone),
        ]);
    }
    let plan = controller.ok(&[
        "deploy",
        "--balanced",
        "alpha@v2",
        "beta@v2",
        "gamma@v2",
        "--updating",
        "b2",
        "--plan",
    ]);
    assert!(plan.contains("zone a: alpha v1 → v2"), "{plan}");
    assert!(plan.contains("updating: b2"), "{plan}");
    assert!(plan.contains("hot deploy in place"), "{plan}");

    // Refused plans change nothing: a server in rotation that would keep the old version, and a
    // version that moves its app to another route.
    controller.ok(&["server", "a2", "deployment", "off"]);
    let e = controller.fails(&["deploy", "--balanced", "alpha@v2", "--plan"]);
    assert!(
        e.contains("a2 is in rotation with its deployment service off"),
        "{e}"
    );
    controller.ok(&["server", "a2", "deployment", "on"]);
    let moved = dir.path().join("alpha-moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::copy(
        fixture("hello-v2").join("hello.wasm"),
        moved.join("hello.wasm"),
    )
    .unwrap();
    std::fs::write(
        moved.join("paddock.toml"),
        "name = \"alpha\"\nversion = \"v3\"\nzone = \"a\"\ncomponent = \"hello.wasm\"\nroute = \"/alpha-new\"\n",
    )
    .unwrap();
    controller.ok(&["app", "upload", &moved.display().to_string()]);
    let e = controller.fails(&["deploy", "--balanced", "alpha@v3"]);
    assert!(
        e.contains("moves the app from route /alpha to /alpha-new"),
        "{e}"
    );

    let load_a = Load::start(lb.addr, "/alpha", 3, PACE);
    let load_b = Load::start(lb.addr, "/beta", 3, PACE);
    let out = controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "alpha@v2",
            "beta@v2",
            "gamma@v2",
            "--updating",
            "b2",
        ])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("deployed in place"), "{}", out.stdout);
    for load in [load_a, load_b] {
        each_client_moved_once(load).await;
    }
    let ops: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let op = &ops[0];
    assert_eq!(op["state"], "succeeded");
    let zones = op["plan"]["zones"].as_array().unwrap();
    let groups: Vec<(&str, Vec<&str>, Vec<&str>)> = zones
        .iter()
        .map(|z| {
            let names = |k: &str| {
                z[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap())
                    .collect()
            };
            (
                z["zone"].as_str().unwrap(),
                names("updating"),
                names("loaded"),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("a", vec!["a1"], vec!["a2"]),
            ("b", vec!["b2"], vec!["b1"]),
            ("c", vec!["c1"], vec![])
        ]
    );
    // Zones one after another: every step of zone a before the first of zone b.
    let zone_order: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["zone"].as_str().unwrap())
        .collect();
    let mut collapsed = zone_order.clone();
    collapsed.dedup();
    assert_eq!(collapsed, ["a", "b", "c"], "{zone_order:?}");
    for (fe, app) in frontends
        .iter()
        .zip(["alpha", "alpha", "beta", "beta", "gamma"])
    {
        fe.wait_serving(app, "v2", &format!("/{app}")).await;
    }

    // Back to v1, the zones side by side: each still gets all its steps.
    let out = controller
        .cli_async(&[
            "deploy",
            "--balanced",
            "alpha@v1",
            "beta@v1",
            "gamma@v1",
            "--parallel-zones",
        ])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let ops: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    assert_eq!(ops[0]["plan"]["parallel_zones"], true);
    let steps = ops[0]["steps"].as_array().unwrap();
    for (zone, count) in [("a", 10), ("b", 10), ("c", 1)] {
        assert_eq!(
            steps
                .iter()
                .filter(|s| s["zone"] == zone && s["state"] == "done")
                .count(),
            count,
            "zone {zone}: {steps:#?}"
        );
    }
    for (fe, app) in frontends
        .iter()
        .zip(["alpha", "alpha", "beta", "beta", "gamma"])
    {
        fe.wait_serving(app, "v1", &format!("/{app}")).await;
    }
}
