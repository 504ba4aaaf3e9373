//! A farm end to end: a real controller (on SQLite and on PostgreSQL), real front-ends following
//! it, driven through the `paddock` CLI as an operator would.

mod harness;

use std::time::Duration;

use harness::{Balancer, Controller, Db, Frontend, fixture};

fn hello(version: &str) -> String {
    fixture(&format!("hello-{version}")).display().to_string()
}

async fn frontend(controller: &Controller, name: &str, zone: &str) -> Frontend {
    Frontend::builder(name)
        .controller(controller, zone)
        .start()
        .await
}

async fn publish_reaches_every_frontend_and_late_joiners(db: Db) {
    let controller = Controller::start(db, "publish", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    let fe2 = frontend(&controller, "fe2", "default").await;

    // Upload stores and compiles, deploys nothing.
    let out = controller.ok(&["app", "upload", &hello("v1")]);
    assert!(out.contains("hello@v1 uploaded and compiled"), "{out}");
    assert_eq!(fe1.serving("hello").await, None);

    // Publish deploys, and returns once every front-end reports it.
    let out = controller.ok(&["app", "publish", &hello("v1")]);
    assert!(out.contains("served by all 2 front-end(s)"), "{out}");
    for fe in [&fe1, &fe2] {
        assert_eq!(
            fe.serving("hello").await.as_deref(),
            Some("v1"),
            "{}",
            fe.name
        );
        let reply = fe.connect().await.get("/hello/").await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "hello from v1\n")
        );
    }

    // The component as uploaded, for a server whose engine the controller does not compile
    // for; only with the join token.
    let component = std::fs::read(fixture("hello-v1").join("hello.wasm")).unwrap();
    let sha = paddock_runtime::sha256_hex(&component);
    let http = reqwest::Client::new();
    let url = |sha: &str| format!("{}/control/v1/components/{sha}", controller.url);
    let got = http
        .get(url(&sha))
        .bearer_auth(&controller.join_token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap() == component);
    let anonymous = http.get(url(&sha)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let unknown = http
        .get(url(&"0".repeat(64)))
        .bearer_auth(&controller.join_token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A front-end started later gets every app of its zone, without anyone publishing again.
    let fe3 = frontend(&controller, "fe3", "default").await;
    fe3.wait_serving("hello", "v1", "/hello/").await;

    controller.ok(&["app", "publish", &hello("v2")]);
    for fe in [&fe1, &fe2, &fe3] {
        fe.wait_serving("hello", "v2", "/hello/").await;
    }

    // Rollback: to the previous version, and to a named one.
    let out = controller.ok(&["app", "rollback", "hello"]);
    assert!(out.contains("rolling hello back to v1"), "{out}");
    for fe in [&fe1, &fe2, &fe3] {
        assert_eq!(fe.serving("hello").await.as_deref(), Some("v1"));
    }
    controller.ok(&["app", "rollback", "hello", "--to", "v2"]);
    // In place, with --json: the versions deployed.
    let deployed: serde_json::Value =
        serde_json::from_str(&controller.ok(&["deploy", "hello@v2", "--json"])).unwrap();
    assert_eq!(deployed[0]["version"], "v2", "{deployed}");
    fe1.wait_serving("hello", "v2", "/hello/").await;
    let err = controller.fails(&["app", "rollback", "hello", "--to", "v9"]);
    assert!(err.contains("unknown app version hello@v9"), "{err}");

    let list = controller.ok(&["app", "list"]);
    assert!(list.contains("hello") && list.contains("v2"), "{list}");
    let versions = controller.ok(&["app", "versions", "hello"]);
    assert!(
        versions.contains("v1") && versions.contains("v2"),
        "{versions}"
    );
    let status = controller.ok(&["status"]);
    assert!(
        status.contains("fe3") && status.contains("up to date"),
        "{status}"
    );
    let servers: serde_json::Value =
        serde_json::from_str(&controller.ok(&["servers", "--json"])).unwrap();
    assert_eq!(servers.as_array().unwrap().len(), 3);

    // A server taken out of the farm for good: stopped, then removed. Removing it while it
    // runs is refused (it would register again at once, back in traffic).
    let err = controller.fails(&["server", "fe3", "remove"]);
    assert!(
        err.contains("fe3 is alive") && err.contains("stop its `paddock frontend` process first"),
        "{err}"
    );
    fe3.stop().await;
    let out = controller.ok(&["server", "fe3", "remove"]);
    assert!(out.contains("fe3 removed"), "{out}");
    let servers: serde_json::Value =
        serde_json::from_str(&controller.ok(&["servers", "--json"])).unwrap();
    assert_eq!(servers.as_array().unwrap().len(), 2, "{servers}");
    let err = controller.fails(&["server", "fe3", "remove"]);
    assert!(err.contains("unknown server \"fe3\""), "{err}");

    // An app's `[config]` is its environment, beside Paddock's own variables.
    let dir = harness::hello_package(
        "hello-v1",
        "name = \"greeter\"\nversion = \"v1\"\ncomponent = \"hello.wasm\"\n\
         [config]\ngreeting = \"hi there\"\n",
    );
    controller.ok(&["app", "publish", &dir.path().display().to_string()]);
    let mut conn = fe1.connect().await;
    for (query, answer) in [
        ("greeting", "greeting=hi there\n"),
        ("PADDOCK_APP", "PADDOCK_APP=greeter\n"),
        ("nothing", "nothing unset\n"),
    ] {
        let reply = conn.get(&format!("/greeter/?env={query}")).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, answer));
    }
}

async fn deployment_off_keeps_the_old_version_then_catches_up(db: Db) {
    let controller = Controller::start(db, "deployoff", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    let fe2 = frontend(&controller, "fe2", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);

    let out = controller.ok(&["server", "fe2", "deployment", "off"]);
    assert!(out.contains("fe2: deployment off"), "{out}");
    let mark = fe2.log_len();
    controller.ok(&["app", "publish", &hello("v2")]);
    fe1.wait_serving("hello", "v2", "/hello/").await;
    // fe2 has seen the new generation, and kept v1.
    fe2.wait_for_log_after(mark, "deployment service is off", Duration::from_secs(30))
        .await;
    let status = controller.ok(&["status"]);
    assert!(
        status.contains("deployment off: hello: serving v1, desired v2"),
        "{status}"
    );
    assert_eq!(fe2.serving("hello").await.as_deref(), Some("v1"));
    let reply = fe2.connect().await.get("/hello/").await.unwrap();
    assert_eq!(reply.version(), Some("v1"));

    controller.ok(&["server", "fe2", "deployment", "on"]);
    fe2.wait_serving("hello", "v2", "/hello/").await;
}

/// Three deploys swap two apps' routes (one at a time, through a spare route); a server with its
/// deployment service off meanwhile gets them all at once when it is turned on, and must swap
/// both apps in one step: one at a time, each would meet the other at its route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_catching_up_takes_two_apps_whose_routes_were_swapped_meanwhile() {
    let controller = Controller::start(Db::Sqlite, "swap", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    let fe2 = frontend(&controller, "fe2", "default").await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = fixture("hello-v1").join("hello.wasm");
    let package = |app: &str, version: &str, route: &str| {
        let p = dir.path().join(format!("{app}-{version}"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("paddock.toml"),
            format!("name = \"{app}\"\nversion = \"{version}\"\ncomponent = \"app.wasm\"\nroute = \"{route}\"\n"),
        )
        .unwrap();
        std::fs::copy(&wasm, p.join("app.wasm")).unwrap();
        p.display().to_string()
    };
    controller.ok(&["app", "publish", &package("a", "v1", "/a")]);
    controller.ok(&["app", "publish", &package("b", "v1", "/b")]);
    fe2.wait_serving("b", "v1", "/b/").await;

    controller.ok(&["server", "fe2", "deployment", "off"]);
    controller.ok(&["app", "publish", &package("a", "v2", "/spare")]);
    controller.ok(&["app", "publish", &package("b", "v2", "/a")]);
    controller.ok(&["app", "publish", &package("a", "v3", "/b")]);
    fe1.wait_serving("a", "v3", "/b/").await;

    controller.ok(&["server", "fe2", "deployment", "on"]);
    fe2.wait_serving("a", "v3", "/b/").await;
    fe2.wait_serving("b", "v2", "/a/").await;
    let mut conn = fe2.connect().await;
    for (path, app) in [("/a/", "b"), ("/b/", "a")] {
        let reply = conn.get(path).await.unwrap();
        assert_eq!(reply.header("x-paddock-app"), Some(app), "{path}");
    }
    let (_, health) = fe2.health().await;
    assert_eq!(health["failed"], serde_json::json!([]), "{health}");
}

/// A version the controller took but a front-end cannot load (here its artifact was damaged in
/// the store) fails the deploy with the front-end's reason once it has lasted, rather than after
/// the whole timeout, and the front-end keeps serving what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_a_frontend_cannot_load_fails_the_deploy_with_its_reason() {
    let controller = Controller::start(Db::Sqlite, "unloadable", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);
    controller.ok(&["app", "upload", &hello("v2")]);
    controller
        .store()
        .await
        .execute_raw("UPDATE artifacts SET bytes = x'00'")
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let out = controller
        .cli_async(&["deploy", "hello@v2", "--timeout", "300s"])
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains("hello@v2 did not load on fe1: ") && out.stderr.contains("artifact"),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "the deploy waited {:?}, as if for its timeout",
        started.elapsed()
    );
    assert_eq!(fe1.serving("hello").await.as_deref(), Some("v1"));
}

async fn a_second_controller_on_the_database_is_refused_naming_the_first(db: Db) {
    let mut controller = Controller::start(db, "second", &[]).await;
    let e = controller.start_another().await;
    assert!(
        e.contains("another controller is running on this database (paddock controller listening on 127.0.0.1:0, ")
            && e.contains(&format!(", pid {} on ", controller.pid())),
        "{e}"
    );
    // A controller that dies releases the database at once: the next one starts.
    controller.restart().await;
    controller.ok(&["servers"]);
}

/// On PostgreSQL the role is a lock on the controller's own connection. When that connection is
/// cut (here by the test, which takes the lock in the same breath, as a second controller could
/// while PostgreSQL restarts), the controller notices, finds the role taken and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_role_was_taken_while_its_connection_was_cut_stops() {
    let mut controller = Controller::start(Db::Postgres, "role_lost", &[]).await;
    let store = controller.store().await;
    let cut = "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = 'advisory' \
               AND granted AND objid = 1346454596 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    // Cut alone: the controller takes the role again and goes on.
    store.execute_raw(cut).await.unwrap();
    controller
        .wait_for_log("holds the controller role again", Duration::from_secs(30))
        .await;
    controller.ok(&["servers"]);
    assert!(store.lock_controller("check").await.is_err());

    store
        .execute_raw(&format!(
            "SET application_name = 'paddock test intruder'; {cut}; \
                 SELECT pg_try_advisory_lock(1346454596);"
        ))
        .await
        .unwrap();
    // The test's session holds the role now (seen from another process: advisory locks are
    // reentrant within a session, and the store's pool may hand that session out again).
    let e = controller.start_another().await;
    assert!(e.contains("(paddock test intruder"), "{e}");

    let status = controller.wait_exited(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = controller
        .wait_for_log(
            "stopping: this controller lost its database connection",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        log.contains("another controller is running on this database (paddock test intruder"),
        "{log}"
    );
}

/// A running front-end the controller no longer knows (its row lost, say with a database restored
/// from a backup) hears `unknown_server` and registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_the_controller_forgot_registers_again() {
    let controller = Controller::start(Db::Sqlite, "forgot", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);
    let mark = fe1.log_len();
    controller
        .store()
        .await
        .execute_raw("DELETE FROM servers WHERE name = 'fe1'")
        .await
        .unwrap();
    // A new generation ends the front-end's long-poll, which now meets `unknown_server`.
    controller.ok(&["zone", "default", "policy", "round-robin"]);
    fe1.wait_for_log_after(
        mark,
        "registered with the controller",
        Duration::from_secs(30),
    )
    .await;
    let servers = controller.ok(&["servers"]);
    assert!(servers.contains("fe1"), "{servers}");
}

/// A standby controller (`--standby`, same address, database and tokens) waits while the active
/// one runs, takes over when it dies, and the farm goes on through it: the CLI and the front-end
/// find it where they found the first.
async fn a_standby_controller_takes_over_when_the_active_one_dies(db: Db) {
    let mut controller = Controller::start(db, "standby", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);
    let standby = controller.start_standby().await;
    controller.ok(&["servers"]);
    assert!(
        !standby.log().contains("listening on http://"),
        "{}",
        standby.log()
    );

    controller.kill();
    standby
        .wait_for_log("listening on http://", Duration::from_secs(30))
        .await;
    controller.ok(&["app", "publish", &hello("v2")]);
    fe1.wait_serving("hello", "v2", "/hello/").await;
}

/// A standby controller at an address of its own: the front-ends, balancers and the CLI are given
/// both addresses, and go on through the standby once it took over (only the controller holding
/// the role listens, so the one that answers is the one to follow).
async fn a_standby_controller_at_its_own_address_is_found(db: Db) {
    let mut controller = Controller::start(db, "standby_own", &[]).await;
    // A port free now, below the range the system hands out for `:0` (where the other tests'
    // processes bind), so that nothing takes it before the standby binds it, after the kill.
    // (The tests of this file run at once in one process: each call starts elsewhere.)
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = 20_000 + ((std::process::id() % 1_000) as u16 * 10 + call * 997) % 12_000;
    let port = (start..32_000)
        .chain(20_000..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap();
    let standby = controller
        .start_standby_at(Some(&format!("127.0.0.1:{port}")))
        .await;
    let urls = format!("{},{}", controller.url, standby.url);
    let fe1 = Frontend::builder("fe1")
        .controller_urls(&urls, &controller.join_token, "default")
        .start()
        .await;
    let lb = Balancer::start_at(&urls, &controller.join_token, "lb1", &[]).await;
    lb.wait_up(&["fe1"], true).await;
    let out = controller.cli_at(&urls, &["app", "publish", &hello("v1")]);
    assert!(out.success, "{}{}", out.stdout, out.stderr);

    controller.kill();
    standby
        .wait_for_log("listening on http://", Duration::from_secs(30))
        .await;
    // Publishing through the standby waits for fe1, which finds it on its own; so does lb1,
    // which reports to it and routes by its table.
    let out = controller.cli_at(&urls, &["app", "publish", &hello("v2")]);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    fe1.wait_serving("hello", "v2", "/hello/").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let routing: serde_json::Value =
            serde_json::from_str(&standby.ok(&["routing", "--json"])).unwrap();
        let generation = routing["generation"].as_i64().unwrap();
        let lb1 = routing["balancers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["report"]["name"] == "lb1")
            .cloned();
        if let Some(lb1) = &lb1
            && lb1["alive"] == true
            && lb1["report"]["generation"].as_i64().unwrap() >= generation
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lb1 never reported to the standby: {routing:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = lb.connect().await;
    let reply = conn.get("/hello").await.unwrap();
    assert_eq!((reply.status, reply.version()), (200, Some("v2")));
    let moved = format!("trying {}", standby.url);
    assert!(
        fe1.log().contains(&moved),
        "fe1 says it moved on: {}",
        fe1.log()
    );
    assert!(
        lb.log().contains(&moved),
        "lb1 says it moved on: {}",
        lb.log()
    );

    // No controller at any of the addresses: the CLI says so, naming them.
    let out = controller.cli_at("http://127.0.0.1:1,http://127.0.0.1:2", &["servers"]);
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("no controller answers at http://127.0.0.1:1, http://127.0.0.1:2"),
        "{}",
        out.stderr
    );
}

async fn zones_keep_their_apps(db: Db) {
    let controller = Controller::start(db, "zones", &[]).await;
    let fe_a = frontend(&controller, "fe-a", "a").await;
    let fe_b = frontend(&controller, "fe-b", "b").await;
    let package = harness::hello_package(
        "hello-v1",
        "name = \"hello\"\nversion = \"v1\"\ncomponent = \"hello.wasm\"\nzone = \"a\"\n",
    );
    let out = controller.ok(&["app", "publish", &package.path().display().to_string()]);
    assert!(
        out.contains("served by all 1 front-end(s) of zone a"),
        "{out}"
    );
    fe_a.wait_serving("hello", "v1", "/hello/").await;
    // fe-b has heartbeated since (status shows it up to date with nothing to serve).
    let status = controller.ok(&["status"]);
    assert!(
        status.contains("fe-b") && status.contains("zone b"),
        "{status}"
    );
    assert_eq!(fe_b.serving("hello").await, None);
    let reply = fe_b.connect().await.get("/hello/").await.unwrap();
    assert_eq!(reply.status, 404);
}

async fn a_frontend_restarted_while_the_controller_is_down_serves_from_its_cache(db: Db) {
    let mut controller = Controller::start(db, "cache", &[]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);
    fe1.wait_serving("hello", "v1", "/hello/").await;

    controller.kill();
    let folders = fe1.stop().await;
    let fe1 = Frontend::builder("fe1")
        .controller(&controller, "default")
        .without_registration()
        .reuse(folders)
        .start()
        .await;
    fe1.wait_serving("hello", "v1", "/hello/").await;
    assert!(
        fe1.log().contains("restored the last desired state"),
        "{}",
        fe1.log()
    );

    // The controller comes back; the front-end registers again and follows it.
    controller.restart().await;
    controller.ok(&["app", "publish", &hello("v2")]);
    fe1.wait_serving("hello", "v2", "/hello/").await;
}

async fn bad_inputs_get_clear_errors_and_change_nothing(db: Db) {
    let controller = Controller::start(db, "bad", &["--max-upload-mib", "1"]).await;
    let fe1 = frontend(&controller, "fe1", "default").await;
    controller.ok(&["app", "publish", &hello("v1")]);
    let before = controller.ok(&["app", "list", "--json"]);

    let dir = tempfile::tempdir().unwrap();
    let package = |manifest: &str, component: &[u8]| {
        let p = tempfile::tempdir_in(dir.path()).unwrap().keep();
        std::fs::write(p.join("paddock.toml"), manifest).unwrap();
        std::fs::write(p.join("app.wasm"), component).unwrap();
        p.display().to_string()
    };
    let wasm = std::fs::read(fixture("hello-v2").join("hello.wasm")).unwrap();

    // A malformed component.
    let bad = package(
        "name = \"hello\"\nversion = \"v3\"\ncomponent = \"app.wasm\"\n",
        b"\0asm nope",
    );
    let err = controller.fails(&["app", "publish", &bad]);
    assert!(err.contains("not a valid WebAssembly component"), "{err}");
    // A bad manifest.
    let err = controller.fails(&[
        "app",
        "upload",
        &package("name = \"Hello\"\ncomponent = \"app.wasm\"\n", &wasm),
    ]);
    assert!(err.contains("field `name`"), "{err}");
    // The same version with other content.
    let dup = package(
        "name = \"hello\"\nversion = \"v1\"\ncomponent = \"app.wasm\"\n",
        &wasm,
    );
    let err = controller.fails(&["app", "publish", &dup]);
    assert!(err.contains("versions are immutable"), "{err}");
    // An oversized upload.
    let mut big = wasm.clone();
    big.resize(2 << 20, 0);
    let err = controller.fails(&[
        "app",
        "upload",
        &package("name = \"big\"\ncomponent = \"app.wasm\"\n", &big),
    ]);
    assert!(err.contains("larger than"), "{err}");
    // An unknown server.
    let err = controller.fails(&["server", "nope", "deployment", "off"]);
    assert!(err.contains("unknown server \"nope\""), "{err}");
    // A wrong token.
    let out = std::process::Command::new(harness::PADDOCK)
        .args(["app", "list"])
        .env("PADDOCK_CONTROLLER", &controller.url)
        .env("PADDOCK_TOKEN", "not-the-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong admin token"));
    // A front-end with a wrong join token is refused, says so and stops: retrying would not
    // help.
    let mut intruder = Frontend::builder("intruder")
        .arg("--controller")
        .arg(&controller.url)
        .arg("--join-token")
        .arg("wrong")
        .start()
        .await;
    intruder
        .wait_for_log("wrong join token", Duration::from_secs(10))
        .await;
    let exit = intruder.wait_exit(Duration::from_secs(10)).await;
    assert!(!exit.success(), "{exit:?}");
    assert!(
        intruder
            .log()
            .contains("refused to register this front-end"),
        "{}",
        intruder.log()
    );
    // So does one whose name the farm cannot take, before it starts anything.
    let out = std::process::Command::new(harness::PADDOCK)
        .args(["frontend", "--controller", &controller.url])
        .args(["--join-token", &controller.join_token, "--name", "FE_1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--name \"FE_1\" is not valid"), "{err}");

    // Nothing changed.
    assert_eq!(controller.ok(&["app", "list", "--json"]), before);
    let servers = controller.ok(&["servers"]);
    assert!(!servers.contains("intruder"), "{servers}");
    assert_eq!(fe1.serving("hello").await.as_deref(), Some("v1"));

    // Requests the API cannot read get its JSON error shape, naming what is wrong.
    let http = reqwest::Client::new();
    let api = |path: &str| format!("{}{path}", controller.url);
    for (request, status, kind, says) in [
        (
            http.post(api("/v1/servers/fe1/lb"))
                .bearer_auth(&controller.admin_token)
                .json(&serde_json::json!({"state": "drained"})),
            422,
            "bad_body",
            "unknown variant `drained`",
        ),
        (
            http.post(api("/v1/servers/fe1/lb"))
                .bearer_auth(&controller.admin_token)
                .body("{}"),
            415,
            "bad_body",
            "Content-Type",
        ),
        (
            http.post(api("/v1/apps"))
                .bearer_auth(&controller.admin_token)
                .body("not a form"),
            400,
            "bad_upload",
            "send a multipart form",
        ),
        (
            http.get(api("/v1/operations/first"))
                .bearer_auth(&controller.admin_token),
            400,
            "bad_path",
            "first",
        ),
        (
            http.get(api(&format!("/control/v1/artifacts/{}", "a".repeat(64))))
                .bearer_auth(&controller.join_token),
            400,
            "bad_query",
            "engine",
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"], kind, "{error}");
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    assert!(controller.ok(&["servers"]).contains("ready"));

    // Another app at a route already taken: stored, but not deployed.
    let greeter = package(
        "name = \"greeter\"\nversion = \"v1\"\ncomponent = \"app.wasm\"\nroute = \"/hello\"\n",
        &wasm,
    );
    let err = controller.fails(&["app", "publish", &greeter]);
    assert!(
        err.contains("route /hello of greeter@v1 is the route of hello@v1 (zone default)"),
        "{err}"
    );
    let status = controller.ok(&["status"]);
    assert!(status.contains("up to date"), "{status}");
    assert_eq!(fe1.serving("greeter").await, None);
    assert_eq!(fe1.serving("hello").await.as_deref(), Some("v1"));
}

macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    publish_reaches_every_frontend_and_late_joiners,
    deployment_off_keeps_the_old_version_then_catches_up,
    a_second_controller_on_the_database_is_refused_naming_the_first,
    a_standby_controller_takes_over_when_the_active_one_dies,
    a_standby_controller_at_its_own_address_is_found,
    zones_keep_their_apps,
    a_frontend_restarted_while_the_controller_is_down_serves_from_its_cache,
    bad_inputs_get_clear_errors_and_change_nothing
);
