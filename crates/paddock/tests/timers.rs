//! App timers end to end: a real controller and three front-ends whose scheduler services
//! claim ticks through the store, on SQLite and on PostgreSQL.

mod harness;

use std::time::{Duration, Instant};

use harness::{Controller, Db, Frontend, fixture};

/// The hello component as app `clock` with two timers: `tick` every second (a 200 ms run) and
/// `long` every hour (a 4 s run, started with `paddock timer run`).
fn clock_package(dir: &std::path::Path, source: &str, version: &str) -> String {
    let to = dir.join(format!("clock-{version}"));
    std::fs::create_dir_all(&to).unwrap();
    std::fs::copy(fixture(source).join("hello.wasm"), to.join("hello.wasm")).unwrap();
    std::fs::write(
        to.join("paddock.toml"),
        format!(
            r#"name = "clock"
version = "{version}"
component = "hello.wasm"
[[timer]]
name = "tick"
every = "1s"
path = "/clock/tick?sleep_ms=200"
[[timer]]
name = "long"
every = "1h"
path = "/clock/long?sleep_ms=4000"
"#
        ),
    )
    .unwrap();
    to.display().to_string()
}

fn runs(controller: &Controller, timer: &str) -> Vec<serde_json::Value> {
    let mut runs: Vec<serde_json::Value> = serde_json::from_str(
        &controller.ok(&["timer", "runs", "clock", timer, "--limit", "1000", "--json"]),
    )
    .unwrap();
    runs.reverse(); // oldest first
    runs
}

fn ms(v: &serde_json::Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or(i64::MAX)
}

/// Waits until `check` holds for the runs of `timer`.
async fn wait_runs(
    controller: &Controller,
    timer: &str,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let runs = runs(controller, timer);
        if check(&runs) {
            return runs;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn timers_across_the_farm(db: Db, test: &str) {
    let controller = Controller::start(db, test, &[]).await;
    let mut frontends = Vec::new();
    for name in ["fe1", "fe2", "fe3"] {
        let mut builder = Frontend::builder(name).controller(&controller, "default");
        if name == "fe3" {
            // Stopped below: it keeps serving 2 s after the signal, and claims nothing then.
            builder = builder.arg("--drain-delay").arg("2s");
        }
        frontends.push(builder.start().await);
    }
    let dir = tempfile::tempdir().unwrap();
    controller.ok(&[
        "app",
        "publish",
        &clock_package(dir.path(), "hello-v1", "v1"),
    ]);
    let list = controller.ok(&["timer", "list"]);
    assert!(list.contains("tick") && list.contains("every 1s"), "{list}");

    // Once across the farm, never overlapping, no tick missing, spread over the servers.
    let seen = wait_runs(&controller, "tick", "8 finished runs", |r| {
        r.iter().filter(|r| r["outcome"] == "ok").count() >= 8
    })
    .await;
    let done: Vec<_> = seen.iter().filter(|r| r["outcome"] == "ok").collect();
    for pair in done.windows(2) {
        assert!(
            ms(pair[1], "started_ms") >= ms(pair[0], "ended_ms"),
            "two runs overlap: {pair:#?}"
        );
        assert_eq!(
            ms(pair[1], "tick_ms") - ms(pair[0], "tick_ms"),
            1000,
            "a tick is missing: {pair:#?}"
        );
    }
    let servers: std::collections::BTreeSet<&str> =
        done.iter().map(|r| r["server"].as_str().unwrap()).collect();
    assert!(servers.len() >= 2, "the runs did not spread: {servers:?}");
    assert!(done.iter().all(|r| r["retry"] == false));

    // Every scheduler off for several intervals: nothing runs; one on: exactly one catch-up
    // run for the missed ticks, then the regular ones.
    for name in ["fe1", "fe2", "fe3"] {
        controller.ok(&["server", name, "scheduler", "off"]);
    }
    let off_at = now_ms();
    let before = wait_runs(&controller, "tick", "the running tick end", |r| {
        r.iter().all(|r| r["outcome"] != "running")
    })
    .await
    .len();
    tokio::time::sleep(Duration::from_millis(3500)).await; // three intervals with no scheduler on
    assert_eq!(
        runs(&controller, "tick").len(),
        before,
        "a tick ran with every scheduler off"
    );
    controller.ok(&["server", "fe2", "scheduler", "on"]);
    let on_at = now_ms();
    let after = wait_runs(
        &controller,
        "tick",
        "the catch-up and one regular run",
        |r| r.len() >= before + 2,
    )
    .await;
    let new = &after[before..];
    let catch_up: Vec<_> = new.iter().filter(|r| ms(r, "tick_ms") < on_at).collect();
    assert_eq!(catch_up.len(), 1, "one catch-up run: {new:#?}");
    assert!(ms(catch_up[0], "tick_ms") > off_at - 1000, "{catch_up:#?}");
    assert!(new.iter().all(|r| r["server"] == "fe2"), "{new:#?}");
    for name in ["fe1", "fe3"] {
        controller.ok(&["server", name, "scheduler", "on"]);
    }

    // A balanced deployment: no tick runs between its step 1 and its step 7.
    controller.ok(&[
        "app",
        "upload",
        &clock_package(dir.path(), "hello-v2", "v2"),
    ]);
    let out = controller
        .cli_async(&["deploy", "--balanced", "clock@v2"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let ops: serde_json::Value =
        serde_json::from_str(&controller.ok(&["op", "list", "--json"])).unwrap();
    let steps = ops[0]["steps"].as_array().unwrap().clone();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).unwrap().clone();
    let (paused_from, paused_until) = (
        ms(&step("scheduler-off"), "ended_ms"),
        ms(&step("scheduler-on-updating"), "started_ms"),
    );
    let during: Vec<_> = runs(&controller, "tick")
        .into_iter()
        .filter(|r| ms(r, "started_ms") > paused_from && ms(r, "started_ms") < paused_until)
        .collect();
    assert!(
        during.is_empty(),
        "ticks ran during the deployment: {during:#?}"
    );
    wait_runs(&controller, "tick", "a tick after the deployment", |r| {
        r.iter()
            .any(|r| ms(r, "started_ms") > paused_until && r["outcome"] == "ok")
    })
    .await;
    let list: serde_json::Value =
        serde_json::from_str(&controller.ok(&["timer", "list", "--json"])).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|t| t["version"] == "v2"),
        "{list:#}"
    );

    // A front-end asked to stop (SIGTERM) during a run lets it end and reports it, and claims
    // no tick from the signal on, its drain delay included (it is the only scheduler on).
    for name in ["fe1", "fe2"] {
        controller.ok(&["server", name, "scheduler", "off"]);
    }
    let due: serde_json::Value =
        serde_json::from_str(&controller.ok(&["timer", "run", "clock", "long", "--json"])).unwrap();
    assert_eq!(due["due_now"], true, "{due}");
    wait_runs(&controller, "long", "the long run on fe3", |r| {
        r.first().is_some_and(|r| r["server"] == "fe3")
    })
    .await;
    let signalled = now_ms();
    frontends[2].signal("TERM");
    frontends[2].wait_exit(Duration::from_secs(30)).await;
    let stopped = runs(&controller, "long");
    assert_eq!(stopped[0]["outcome"], "ok", "{stopped:#?}");
    assert!(ms(&stopped[0], "ended_ms") - ms(&stopped[0], "started_ms") >= 3900);
    // A claim already in flight at the signal still runs what it brought: 300 ms of slack.
    let late: Vec<_> = runs(&controller, "tick")
        .into_iter()
        .filter(|r| r["server"] == "fe3" && ms(r, "started_ms") > signalled + 300)
        .collect();
    assert!(
        late.is_empty(),
        "fe3 claimed ticks after SIGTERM: {late:#?}"
    );
    for name in ["fe1", "fe2"] {
        controller.ok(&["server", name, "scheduler", "on"]);
    }

    // A server dies during a long run: the tick runs again elsewhere after the lease, as a retry.
    controller.ok(&["timer", "run", "clock", "long"]);
    let first = wait_runs(&controller, "long", "the long run start", |r| r.len() >= 2).await;
    let first = &first[1..];
    let owner = first[0]["server"].as_str().unwrap().to_string();
    // Switching its scheduler off is confirmed only once its runs end: here, not in time.
    let e = controller.fails(&[
        "server",
        &owner,
        "scheduler",
        "off",
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert!(
        e.contains(&format!("timers still running on {owner}")) && e.contains("clock/long"),
        "{e}"
    );
    let index = ["fe1", "fe2", "fe3"]
        .iter()
        .position(|n| *n == owner)
        .unwrap();
    let killed_at = now_ms();
    frontends[index].signal("KILL");
    let runs = wait_runs(&controller, "long", "the retry", |r| r.len() >= 3).await;
    let runs = &runs[1..];
    assert_eq!(runs[0]["outcome"], "lost", "{runs:#?}");
    assert!(
        runs[0]["detail"]
            .as_str()
            .unwrap()
            .contains("stopped renewing"),
        "{runs:#?}"
    );
    assert_eq!(runs[1]["retry"], true, "{runs:#?}");
    assert_ne!(runs[1]["server"], owner.as_str());
    assert_eq!(
        runs[1]["tick_ms"], runs[0]["tick_ms"],
        "the same tick runs again"
    );
    eprintln!(
        "takeover of a dead server's tick: {} ms after the SIGKILL",
        ms(&runs[1], "started_ms") - killed_at
    );

    // Bad input changes nothing.
    let e = controller.fails(&["timer", "run", "clock", "nope"]);
    assert!(e.contains("unknown timer clock/nope"), "{e}");
    let e = controller.fails(&["timer", "runs", "nope", "tick"]);
    assert!(e.contains("unknown timer nope/tick"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_run_once_across_the_farm_on_sqlite() {
    timers_across_the_farm(Db::Sqlite, "timers_sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_run_once_across_the_farm_on_postgres() {
    timers_across_the_farm(Db::Postgres, "timers_pg").await;
}

/// A run fails when the app breaks off its answer, even after a 200 head; a 200 answered whole
/// is a success. (The `trap` component answers 200 and part of a body, then traps, with
/// `?after_head=1`; the hello component answers whole.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_answer_breaks_off_after_its_head_fails() {
    let controller = Controller::start(Db::Sqlite, "timers_broken", &[]).await;
    let _fe = Frontend::builder("fe1")
        .controller(&controller, "default")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("trap");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::copy(fixture("trap").join("trap.wasm"), package.join("trap.wasm")).unwrap();
    std::fs::write(
        package.join("paddock.toml"),
        "name = \"trap\"\nversion = \"v1\"\ncomponent = \"trap.wasm\"\n\
         [[timer]]\nname = \"half\"\nevery = \"1h\"\npath = \"/trap/half?after_head=1\"\n",
    )
    .unwrap();
    controller.ok(&["app", "publish", &package.display().to_string()]);
    controller.ok(&["timer", "run", "trap", "half"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    let run = loop {
        let runs: Vec<serde_json::Value> =
            serde_json::from_str(&controller.ok(&["timer", "runs", "trap", "half", "--json"]))
                .unwrap();
        if let Some(run) = runs.iter().find(|r| r["outcome"] != "running") {
            break run.clone();
        }
        assert!(Instant::now() < deadline, "no run ended: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run["outcome"], "failed", "{run:#?}");
    let detail = run["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("answered 200") && detail.contains("body broke off"),
        "{run:#?}"
    );
}
