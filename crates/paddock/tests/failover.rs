//! Active and passive front-ends end to end: a passive server stands by (deployed, no traffic,
//! no timers), `paddock server NAME role active|passive` moves it, and the controller activates
//! it by itself when an active server dies.

mod harness;

use std::time::{Duration, Instant};

use harness::{Balancer, Controller, Db, Frontend, Load, failures, fixture};

/// Every server's (name, role).
fn roles(controller: &Controller) -> Vec<(String, String)> {
    let servers: serde_json::Value =
        serde_json::from_str(&controller.ok(&["servers", "--json"])).unwrap();
    servers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn role_pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
}

/// The desired state a front-end gets from the controller.
async fn desired_of(controller: &Controller, name: &str) -> serde_json::Value {
    controller
        .control_get(&format!("/control/v1/desired/{name}"))
        .await
}

/// A controller started with `args`, front-ends `names` in zone default, a balancer that sees
/// them all up, and hello@v1 published.
async fn farm(test: &str, args: &[&str], names: &[&str]) -> (Controller, Vec<Frontend>, Balancer) {
    let controller = Controller::start(Db::Sqlite, test, args).await;
    let mut fes = Vec::new();
    for name in names {
        fes.push(
            Frontend::builder(name)
                .controller(&controller, "default")
                .start()
                .await,
        );
    }
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(names, true).await;
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    (controller, fes, lb)
}

/// Waits (at most 30 s) until `paddock status --json` says `check` of server `name`'s entry
/// (`{"server": ServerInfo, "alive", ...}`).
async fn wait_status(
    controller: &Controller,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&controller.ok(&["status", "--json"])).unwrap();
        let entry = status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["server"]["name"] == name)
            .unwrap()
            .clone();
        if check(&entry) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {entry}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_server_stands_by_and_takes_over_when_an_active_one_dies() {
    let (controller, fes, lb) = farm(
        "failover",
        &["--failover-after", "6s"],
        &["fe1", "fe2", "fe3", "fe4", "fe5"],
    )
    .await;

    // fe3 and fe4 stand by: in the balancers' table as maint, no timers, still deployed to.
    for name in ["fe3", "fe4"] {
        let out = controller.ok(&["server", name, "role", "passive", "--wait"]);
        assert!(
            out.contains(&format!(
                "{name}: passive, acknowledged by 1 live balancer(s)"
            )) && out.contains("drained (nothing in flight)"),
            "{out}"
        );
    }
    assert_eq!(desired_of(&controller, "fe3").await["scheduler"], false);
    assert_eq!(desired_of(&controller, "fe1").await["scheduler"], true);
    // Activated and back, with the wait: in rotation once the balancer's checks pass for it.
    let out = controller.ok(&["server", "fe4", "role", "active", "--wait"]);
    assert!(out.contains("health checks pass on all of them"), "{out}");
    let mut conn = lb.connect().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let reply = conn.get("/hello").await.unwrap();
        seen.insert(reply.header("x-paddock-server").unwrap_or("").to_string());
    }
    assert!(seen.contains("fe4"), "{seen:?}");
    controller.ok(&["server", "fe4", "role", "passive", "--wait"]);

    controller.ok(&["app", "publish", &fixture("hello-v2").display().to_string()]);
    fes[2].wait_serving("hello", "v2", "/hello").await;
    let load = Load::start(lb.addr, "/hello", 4, Duration::from_millis(2));
    for _ in 0..20 {
        let reply = conn.get("/hello").await.unwrap();
        let server = reply.header("x-paddock-server");
        assert!(server != Some("fe3") && server != Some("fe4"), "{server:?}");
    }

    // fe2 is stopped on purpose (it says so), then fe1 dies. The balancer routes around both at
    // once (fe5 serves meanwhile); 6 s after fe1's last heartbeat the controller activates fe3
    // in its place, and fe1 becomes a standby. fe2, silent longer, is not failed over, and fe4
    // stays passive.
    fes[1].signal("TERM");
    wait_status(&controller, "fe2", "said it stops", |s| {
        s["server"]["observed"]["state"] == "stopping"
    })
    .await;
    fes[0].signal("KILL");
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(30);
    let failed_over = role_pairs(&[
        ("fe1", "passive"),
        ("fe2", "active"),
        ("fe3", "active"),
        ("fe4", "passive"),
        ("fe5", "active"),
    ]);
    while roles(&controller) != failed_over {
        assert!(
            Instant::now() < deadline,
            "no failover: {:?}",
            roles(&controller)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed_at.elapsed() >= Duration::from_secs(5),
        "failed over before --failover-after"
    );
    assert_eq!(desired_of(&controller, "fe3").await["scheduler"], true);
    lb.wait_up(&["fe3"], true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = conn.get("/hello").await.unwrap();
        assert_eq!(reply.status, 200);
        if reply.header("x-paddock-server") == Some("fe3") {
            break;
        }
        assert!(Instant::now() < deadline, "fe3 never got a request");
    }
    let samples = load.stop().await;
    assert_eq!(failures(&samples), Vec::<String>::new(), "GETs failed");
    let audit = controller.admin_get("/v1/audit").await;
    assert!(
        audit.contains("fe3 takes over from fe1 in zone default"),
        "{audit}"
    );
    assert!(!audit.contains("from fe2"), "{audit}");

    // A server the controller counts as down is not put back in rotation, and nothing changes.
    wait_status(&controller, "fe1", "counted as down", |s| {
        s["alive"] == false
    })
    .await;
    let e = controller.fails(&["server", "fe1", "role", "active"]);
    assert!(
        e.contains("fe1 is down (no heartbeat for") && e.contains("nothing changed"),
        "{e}"
    );
    assert_eq!(roles(&controller), failed_over);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_on_its_versions_is_not_activated() {
    // A failover delay a late heartbeat could trip is refused, naming the flag.
    let out = std::process::Command::new(harness::PADDOCK)
        .args(["controller", "--failover-after", "2s"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--failover-after") && e.contains("at least 6s"),
        "{e}"
    );
    let controller = Controller::start(Db::Sqlite, "activate", &["--failover-after", "0s"]).await;
    let fe1 = Frontend::builder("fe1")
        .controller(&controller, "default")
        .start()
        .await;
    let _fe2 = Frontend::builder("fe2")
        .controller(&controller, "default")
        .start()
        .await;
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    controller.ok(&["server", "fe2", "role", "passive"]);
    controller.ok(&["server", "fe2", "deployment", "off"]);
    controller.ok(&["app", "publish", &fixture("hello-v2").display().to_string()]);
    fe1.wait_serving("hello", "v2", "/hello").await;
    let e = controller.fails(&["server", "fe2", "role", "active"]);
    assert!(
        e.contains("fe2 does not serve hello@v2 (it serves v1) yet")
            && e.contains("nothing changed"),
        "{e}"
    );
    assert_eq!(
        roles(&controller),
        role_pairs(&[("fe1", "active"), ("fe2", "passive")])
    );
    let e = controller.fails(&["server", "fe1", "role", "passive"]);
    assert!(
        e.contains("fe1 is the last active front-end of zone default")
            && e.contains("nothing changed"),
        "{e}"
    );
    // Caught up, it is activated.
    controller.ok(&["server", "fe2", "deployment", "on"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = controller.cli(&["server", "fe2", "role", "active"]);
        if out.success {
            break;
        }
        assert!(
            out.stderr.contains("does not serve hello@v2") && Instant::now() < deadline,
            "{}",
            out.stderr
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        roles(&controller),
        role_pairs(&[("fe1", "active"), ("fe2", "active")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_deployment_leaves_a_passive_server_out_and_it_takes_the_new_version() {
    let (controller, fes, _lb) = farm("passive_deploy", &[], &["fe1", "fe2", "fe3"]).await;
    controller.ok(&["app", "upload", &fixture("hello-v2").display().to_string()]);
    controller.ok(&["server", "fe3", "role", "passive", "--wait"]);

    let plan = controller.ok(&["deploy", "--balanced", "hello@v2", "--plan"]);
    assert!(plan.contains("left alone: fe3 (passive)"), "{plan}");
    assert!(
        plan.contains("updating: fe1") && plan.contains("loaded:   fe2"),
        "{plan}"
    );
    let out = controller
        .cli_async(&["deploy", "--balanced", "hello@v2"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    // The standby is on the new version too, and still a standby.
    fes[2].wait_serving("hello", "v2", "/hello").await;
    assert_eq!(
        roles(&controller),
        role_pairs(&[("fe1", "active"), ("fe2", "active"), ("fe3", "passive")])
    );
    assert_eq!(desired_of(&controller, "fe3").await["scheduler"], false);
    let status = controller.ok(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("fe3") && l.contains("passive") && l.contains("scheduler -")),
        "{status}"
    );
}
