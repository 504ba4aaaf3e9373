//! App data end to end: the `counter` app keeps values through `wasi:keyvalue` in the farm's
//! database, reached by every front-end, and its users' sessions follow them from front-end to
//! front-end and across a balanced deployment.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::{Balancer, Conn, Controller, Db, Frontend, Reply, fixture};

/// A controller on `db`, front-ends `fe1..fe3` keeping app data in its database, a balancer;
/// counter@v1 published, counter@v2 uploaded.
async fn farm(test: &str, db: Db) -> (Controller, Vec<Frontend>, Balancer) {
    let controller = Controller::start(db, test, &[]).await;
    let mut frontends = Vec::new();
    for i in 1..=3 {
        frontends.push(
            Frontend::builder(&format!("fe{i}"))
                .controller(&controller, "default")
                .db(&controller)
                .start()
                .await,
        );
    }
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    lb.wait_up(&["fe1", "fe2", "fe3"], true).await;
    controller.ok(&[
        "app",
        "publish",
        &fixture("counter-v1").display().to_string(),
    ]);
    controller.ok(&[
        "app",
        "upload",
        &fixture("counter-v2").display().to_string(),
    ]);
    for fe in &frontends {
        fe.wait_serving("counter", "v1", "/counter/").await;
    }
    (controller, frontends, lb)
}

/// The session id a response's `Set-Cookie` hands out, checking the cookie's attributes (the
/// default `session_idle` is a day).
fn session_cookie(reply: &Reply) -> Option<String> {
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(cookies.len() <= 1, "{cookies:?}");
    let cookie = cookies.first()?;
    assert!(
        cookie.ends_with("; Path=/counter; Max-Age=86400; HttpOnly; SameSite=Lax"),
        "{cookie}"
    );
    let (name, rest) = cookie.split_once('=').unwrap();
    assert_eq!(name, "paddock_session_counter");
    Some(rest.split(';').next().unwrap().to_string())
}

fn cookie(id: &str) -> String {
    format!("paddock_session_counter={id}")
}

/// `visits=N version=V` → (N, V).
fn visits(reply: &Reply) -> (u64, String) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut words = reply.body.split_whitespace();
    let n = words.next().unwrap().strip_prefix("visits=").unwrap();
    let v = words.next().unwrap().strip_prefix("version=").unwrap();
    (n.parse().unwrap(), v.to_string())
}

async fn app_data_and_sessions(test: &str, db: Db) {
    let (controller, frontends, lb) = farm(test, db).await;

    // A counter in the app's bucket, incremented from every front-end at once, counts each
    // increment exactly once.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let addr = lb.addr;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..15 {
                let reply = conn.get("/counter/hits").await.unwrap();
                assert_eq!(reply.status, 200, "{}", reply.body);
                let hits: u64 = reply
                    .body
                    .trim()
                    .strip_prefix("hits=")
                    .unwrap()
                    .parse()
                    .unwrap();
                seen.push((hits, reply.header("x-paddock-server").unwrap().to_string()));
            }
            seen
        }));
    }
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.await.unwrap());
    }
    let mut hits: Vec<u64> = seen.iter().map(|(hits, _)| *hits).collect();
    hits.sort();
    assert_eq!(hits, (1..=60).collect::<Vec<u64>>());
    let servers: std::collections::BTreeSet<_> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(servers.len(), 3, "{servers:?}");

    // A value written on one front-end is read on another.
    let mut fe1 = frontends[0].connect().await;
    let mut fe2 = frontends[1].connect().await;
    let put = fe1
        .get("/counter/put?key=greeting&value=hej")
        .await
        .unwrap();
    assert_eq!(put.body, "stored\n");
    assert_eq!(
        fe2.get("/counter/get?key=greeting").await.unwrap().body,
        "hej\n"
    );
    assert_eq!(fe2.get("/counter/keys").await.unwrap().body, "greeting\n");

    // Reading a session that does not exist creates none.
    let mut conn = lb.connect().await;
    let peek = conn.get("/counter/peek").await.unwrap();
    assert_eq!(peek.body, "visits=none\n");
    assert_eq!(session_cookie(&peek), None);
    // The first write starts one, and the cookie carries it to every front-end.
    let first = conn.get("/counter/visit").await.unwrap();
    assert_eq!(visits(&first), (1, "v1".into()));
    let alice = session_cookie(&first).expect("a session cookie");
    assert_eq!(alice.len(), 32, "{alice}");
    let mut served_by = std::collections::BTreeSet::new();
    for n in 2..=6 {
        let reply = conn
            .get_with("/counter/visit", &[("cookie", &cookie(&alice))])
            .await
            .unwrap();
        assert_eq!(visits(&reply), (n, "v1".into()));
        // Just made, the session is not extended yet (a tenth of its day first): no cookie.
        assert_eq!(session_cookie(&reply), None);
        served_by.insert(reply.header("x-paddock-server").unwrap().to_string());
    }
    assert_eq!(served_by.len(), 3, "{served_by:?}");
    // Another user has a session of their own.
    let bob = conn.get("/counter/visit").await.unwrap();
    assert_eq!(visits(&bob), (1, "v1".into()));
    assert_ne!(session_cookie(&bob).unwrap(), alice);
    // Through the balancer over plain HTTP the cookie is not `Secure` (above); a request the
    // balancer took over HTTPS (it says so in `X-Forwarded-Proto`) gets a `Secure` one.
    let over_https = conn
        .get_with("/counter/visit", &[("x-forwarded-proto", "https")])
        .await
        .unwrap();
    let set = over_https.header("set-cookie").unwrap();
    assert!(
        set.ends_with("; HttpOnly; SameSite=Lax"),
        "the balancer replaced what the client claimed: {set}"
    );
    let direct = frontends[0]
        .connect()
        .await
        .get_with("/counter/visit", &[("x-forwarded-proto", "https")])
        .await
        .unwrap();
    let set = direct.header("set-cookie").unwrap();
    assert!(
        set.ends_with("; Path=/counter; Max-Age=86400; HttpOnly; SameSite=Lax; Secure"),
        "{set}"
    );
    // An id the client made up, or a malformed one, is not taken: a fresh session starts,
    // under an id Paddock chose.
    for forged in ["0123456789abcdef0123456789abcdef", "../../etc", ""] {
        let reply = conn
            .get_with("/counter/visit", &[("cookie", &cookie(forged))])
            .await
            .unwrap();
        assert_eq!(visits(&reply).0, 1, "{forged:?}");
        let id = session_cookie(&reply).unwrap();
        assert!(id != forged && id != alice, "{forged:?} gave {id}");
    }
    // The app never sees Paddock's session cookies (an app must not read another's session id),
    // and cannot set one (nor fix another app's users' session); its own cookies pass.
    let reply = conn
        .get_with(
            "/counter/cookie",
            &[(
                "cookie",
                &format!("theme=light; {}; paddock_session_blog=x", cookie(&alice)),
            )],
        )
        .await
        .unwrap();
    assert_eq!(reply.body, "cookie: theme=light\n");
    let set: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(set, ["theme=dark"]);
    // A session cannot start once the response head is out (its cookie would be lost).
    let late = conn.get("/counter/late").await.unwrap();
    assert!(
        late.body
            .contains("cannot start after the response head was sent"),
        "{}",
        late.body
    );
    assert_eq!(session_cookie(&late), None);

    // A user visiting all through a balanced deployment keeps their session: every visit
    // counts once, in order, and the version moves from v1 to v2 once.
    let stop = Arc::new(AtomicBool::new(false));
    let visitor = {
        let stop = stop.clone();
        let (addr, alice) = (lb.addr, alice.clone());
        tokio::spawn(async move {
            let mut conn = Conn::open(addr).await.unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = conn
                    .get_with("/counter/visit", &[("cookie", &cookie(&alice))])
                    .await
                    .unwrap();
                seen.push(visits(&reply));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = controller
        .cli_async(&["deploy", "--balanced", "counter@v2"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = visitor.await.unwrap();
    eprintln!("{} visits during the deployment", seen.len());
    assert!(seen.len() > 20, "too few visits: {}", seen.len());
    let counts: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, (7..7 + seen.len() as u64).collect::<Vec<u64>>());
    let mut versions: Vec<&str> = seen.iter().map(|(_, v)| v.as_str()).collect();
    versions.dedup();
    assert_eq!(versions, ["v1", "v2"]);
    // The bucket outlived the deployment too.
    let hits = conn.get("/counter/hits").await.unwrap();
    assert_eq!(hits.body, "hits=61\n");

    // A timer tick reaches the app's buckets, and has no session (the app answers 500 if it
    // could write one, failing the run).
    controller.ok(&["timer", "run", "counter", "tick"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runs: Vec<serde_json::Value> =
            serde_json::from_str(&controller.ok(&["timer", "runs", "counter", "tick", "--json"]))
                .unwrap();
        assert!(
            runs.iter()
                .all(|r| r["outcome"] == "ok" || r["outcome"] == "running"),
            "{runs:#?}"
        );
        if runs.iter().any(|r| r["outcome"] == "ok") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tick ran: {runs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = conn
        .get("/counter/get?bucket=default&key=ticks")
        .await
        .unwrap();
    let ticks: u64 = ticks.body.trim().parse().unwrap();
    assert!(ticks >= 1, "{ticks}");

    // `paddock data`: the operator sees and mends what the app keeps.
    let summary: serde_json::Value =
        serde_json::from_str(&controller.ok(&["data", "show", "counter", "--json"])).unwrap();
    let buckets = summary["buckets"].as_array().unwrap();
    assert_eq!(buckets[0]["name"], "", "{summary:#}");
    assert_eq!(buckets[0]["keys"], 2, "hits and ticks: {summary:#}");
    assert_eq!(buckets[1]["name"], "notes", "{summary:#}");
    assert_eq!(buckets[1]["bytes"], 3, "{summary:#}");
    assert!(
        summary["live_sessions"].as_i64().unwrap() >= 5,
        "{summary:#}"
    );
    let text = controller.ok(&["data", "show", "counter"]);
    assert!(
        text.contains("(default)") && text.contains("notes"),
        "{text}"
    );
    assert_eq!(
        controller.ok(&["data", "keys", "counter", "--bucket", "notes"]),
        "greeting\n"
    );
    assert_eq!(
        controller.ok(&["data", "get", "counter", "greeting", "--bucket", "notes"]),
        "hej"
    );
    controller.ok(&[
        "data", "set", "counter", "greeting", "hallo", "--bucket", "notes",
    ]);
    let get = conn.get("/counter/get?key=greeting").await.unwrap();
    assert_eq!(get.body, "hallo\n", "the app sees the operator's value");
    controller.ok(&["data", "delete", "counter", "greeting", "--bucket", "notes"]);
    assert_eq!(
        conn.get("/counter/get?key=greeting").await.unwrap().body,
        "none\n"
    );
    // Bad input changes nothing and says what is wrong.
    let e = controller.fails(&["data", "get", "counter", "greeting", "--bucket", "notes"]);
    assert!(e.contains("no key \"greeting\""), "{e}");
    let e = controller.fails(&["data", "show", "nope"]);
    assert!(e.contains("unknown app \"nope\""), "{e}");
    let long = "k".repeat(1025);
    let e = controller.fails(&["data", "set", "counter", &long, "v"]);
    assert!(e.contains("over the limit of 1024"), "{e}");
    let e = controller.fails(&["data", "keys", "counter", "--bucket", "session"]);
    assert!(e.contains("not a bucket"), "{e}");
    let keys = controller.ok(&["data", "keys", "counter"]);
    assert_eq!(keys, "hits\nticks\n");
    // Ending the app's sessions logs every user out: Alice starts anew.
    let ended: serde_json::Value =
        serde_json::from_str(&controller.ok(&["data", "end-sessions", "counter", "--json"]))
            .unwrap();
    assert!(ended["ended"].as_u64().unwrap() >= 5, "{ended}");
    let visit = conn
        .get_with("/counter/visit", &[("cookie", &cookie(&alice))])
        .await
        .unwrap();
    assert_eq!(visits(&visit).0, 1);
    assert_ne!(session_cookie(&visit).unwrap(), alice);
    let audit = controller.admin_get("/v1/audit").await;
    assert!(
        audit.contains("data-set") && audit.contains("sessions-end"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_data_and_sessions_on_sqlite() {
    app_data_and_sessions("data_sqlite", Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_data_and_sessions_on_postgres() {
    app_data_and_sessions("data_postgres", Db::Postgres).await;
}

/// A front-end on its own (`--apps`) keeps app data in a database of its own; one without
/// `--db` answers the app's request with an error that says what to give; one pointed at a
/// database no controller created refuses to start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_app_data_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let own = format!("sqlite://{}", dir.path().join("own.db").display());
    let alone = Frontend::builder("alone")
        .package("counter-v1", "counter")
        .arg("--secure-cookies")
        .arg("--db")
        .arg(&own)
        .start()
        .await;
    alone.wait_serving("counter", "v1", "/counter/").await;
    let mut conn = alone.connect().await;
    assert_eq!(conn.get("/counter/hits").await.unwrap().body, "hits=1\n");
    assert_eq!(conn.get("/counter/hits").await.unwrap().body, "hits=2\n");
    // The manifest's session_idle is the session's life, and the cookie's; --secure-cookies
    // makes it Secure. Used after a tenth of its idle time, a session is extended and its
    // cookie sent again; unused for its idle time, it is gone.
    let manifest = alone.apps_dir.join("counter/paddock.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace("version = \"v1\"", "version = \"v1-idle\"");
    let (head, _timers) = text.split_once("[[timer]]").unwrap();
    let text = format!("{head}[limits]\nsession_idle = \"3s\"\n");
    harness::write_atomically(&manifest, text.as_bytes());
    alone.wait_serving("counter", "v1-idle", "/counter/").await;
    let created = std::time::Instant::now();
    let visit = conn.get("/counter/visit").await.unwrap();
    assert_eq!(visit.body, "visits=1 version=v1\n");
    let set = visit.header("set-cookie").unwrap();
    assert!(
        set.ends_with("; Path=/counter; Max-Age=3; HttpOnly; SameSite=Lax; Secure"),
        "{set}"
    );
    let id = set.split(';').next().unwrap().to_string();
    let cookie_of = |reply: &Reply| {
        reply
            .header("set-cookie")
            .map(|c| c.split(';').next().unwrap().to_string())
    };
    // Past a tenth of its idle time, a use extends it (to 3 s from now) and sends the cookie.
    tokio::time::sleep_until((created + Duration::from_millis(500)).into()).await;
    let again = conn
        .get_with("/counter/visit", &[("cookie", &id)])
        .await
        .unwrap();
    assert_eq!(again.body, "visits=2 version=v1\n");
    assert_eq!(
        cookie_of(&again),
        Some(id.clone()),
        "extended: the cookie goes again"
    );
    // Past its first expiry (3 s after it was made), before its extended one: still there.
    tokio::time::sleep_until((created + Duration::from_millis(3_250)).into()).await;
    let extended = conn
        .get_with("/counter/visit", &[("cookie", &id)])
        .await
        .unwrap();
    assert_eq!(extended.body, "visits=3 version=v1\n", "the extension held");
    // Unused for its idle time, it is gone.
    tokio::time::sleep(Duration::from_millis(3_400)).await;
    let later = conn
        .get_with("/counter/visit", &[("cookie", &id)])
        .await
        .unwrap();
    assert_eq!(later.body, "visits=1 version=v1\n", "the session expired");
    assert_ne!(cookie_of(&later).unwrap(), id);

    let without = Frontend::builder("without")
        .package("counter-v1", "counter")
        .start()
        .await;
    without.wait_serving("counter", "v1", "/counter/").await;
    let reply = without.connect().await.get("/counter/hits").await.unwrap();
    assert_eq!(reply.status, 500);
    assert!(reply.body.contains("start it with --db"), "{}", reply.body);

    let controller = Controller::start(Db::Sqlite, "data_unmigrated", &[]).await;
    // An existing file without the tables (a misspelt path is refused as missing, not created).
    std::fs::write(dir.path().join("empty.db"), b"").unwrap();
    let empty = format!("sqlite://{}", dir.path().join("empty.db").display());
    let mut refused = Frontend::builder("refused")
        .controller(&controller, "default")
        .arg("--db")
        .arg(&empty)
        .spawn();
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = refused.log();
    assert!(log.contains("no app data tables"), "{log}");
    assert!(
        log.contains("start this release's controller on it once"),
        "{log}"
    );
}

/// Waits until every front-end answers `path` with `body`.
async fn wait_all_answer(frontends: &[Frontend], path: &str, body: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for fe in frontends {
        let mut conn = fe.connect().await;
        loop {
            let reply = conn.get(path).await.unwrap();
            if reply.body == body {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} answers {path} with {:?}, not {body:?}",
                fe.name,
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `[config]` reaches the app through `wasi:config/store`; `paddock config set` overrides a value
/// for every version at once, without a new version, and `unset` gives the manifest's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_its_overrides_on_sqlite() {
    config_and_its_overrides("config_sqlite", Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_its_overrides_on_postgres() {
    config_and_its_overrides("config_postgres", Db::Postgres).await;
}

async fn config_and_its_overrides(test: &str, db: Db) {
    let (controller, frontends, lb) = farm(test, db).await;
    let mut conn = lb.connect().await;
    let reply = conn.get("/counter/config?key=greeting").await.unwrap();
    assert_eq!(reply.body, "hello from the manifest of v1\n");

    let set = controller.ok(&["config", "set", "counter", "greeting", "hej", "--wait"]);
    assert!(
        set.contains("greeting") && set.contains("override"),
        "{set}"
    );
    assert!(set.contains("every front-end of its zone runs it"), "{set}");
    // --wait returned: every front-end runs the new value now, asked right away; each swapped
    // in the code it had loaded (no load time), with the new config.
    for fe in &frontends {
        let reply = fe
            .connect()
            .await
            .get("/counter/config?key=greeting")
            .await
            .unwrap();
        assert_eq!(reply.body, "hej\n", "{} after --wait", fe.name);
        let log = fe.log();
        let swapped = log
            .lines()
            .rev()
            .find(|l| l.contains("app deployed app=counter version=v1"))
            .unwrap();
        assert!(swapped.contains("load_ms=0"), "{swapped}");
    }
    // A front-end that does not take it holds --wait up, which fails naming it (fe3, stopped,
    // counts as alive for a few seconds more).
    frontends[2].signal("STOP");
    let e = controller.fails(&[
        "config",
        "set",
        "counter",
        "size",
        "xl",
        "--wait",
        "--timeout",
        "1s",
    ]);
    frontends[2].signal("CONT");
    assert!(
        e.contains("do not report running counter with it yet: fe3"),
        "{e}"
    );
    let shown = controller.ok(&["config", "show", "counter"]);
    assert!(
        shown.contains("size") && shown.contains("xl"),
        "the change stands: {shown}"
    );
    controller.ok(&["config", "unset", "counter", "size", "--wait"]);
    wait_all_answer(&frontends, "/counter/config?key=greeting", "hej\n").await;
    controller.ok(&["config", "set", "counter", "colour", "blue"]);
    wait_all_answer(&frontends, "/counter/config", "colour=blue\ngreeting=hej\n").await;
    let shown: serde_json::Value =
        serde_json::from_str(&controller.ok(&["config", "show", "counter", "--json"])).unwrap();
    assert_eq!(shown["version"], "v1");
    assert_eq!(
        shown["manifest"]["greeting"],
        "hello from the manifest of v1"
    );
    assert_eq!(shown["overrides"]["greeting"], "hej");
    assert_eq!(shown["effective"]["colour"], "blue");
    // Still v1, the same component: no version was made for it.
    let versions = controller.ok(&["app", "versions", "counter"]);
    assert_eq!(versions.matches("counter").count(), 2, "{versions}");

    // Bad input is refused, naming the problem, and changes nothing.
    for (key, problem) in [
        ("PADDOCK_X", "not starting with PADDOCK_"),
        ("1st", "use an environment variable name"),
    ] {
        let e = controller.fails(&["config", "set", "counter", key, "v"]);
        assert!(e.contains(problem) && e.contains("nothing changed"), "{e}");
    }
    let e = controller.fails(&["config", "unset", "counter", "never_set"]);
    assert!(e.contains("has no override of \"never_set\""), "{e}");
    let e = controller.fails(&["config", "set", "nope", "a", "b"]);
    assert!(e.contains("unknown app \"nope\""), "{e}");
    let shown: serde_json::Value =
        serde_json::from_str(&controller.ok(&["config", "show", "counter", "--json"])).unwrap();
    assert_eq!(
        shown["overrides"].as_object().unwrap().len(),
        2,
        "{shown:#}"
    );

    // An override holds for the next version too; unset, the manifest's value is back.
    let out = controller
        .cli_async(&["deploy", "--balanced", "counter@v2"])
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let reply = conn.get("/counter/config?key=greeting").await.unwrap();
    assert_eq!(
        (reply.version(), reply.body.as_str()),
        (Some("v2"), "hej\n")
    );
    // Like a deploy, a front-end with deployment off keeps what it has (and --wait does not wait
    // for it); turned on, it catches up.
    controller.ok(&["server", "fe3", "deployment", "off"]);
    controller.ok(&["config", "set", "counter", "colour", "red", "--wait"]);
    for fe in &frontends[..2] {
        let reply = fe
            .connect()
            .await
            .get("/counter/config?key=colour")
            .await
            .unwrap();
        assert_eq!(reply.body, "red\n", "{} after --wait", fe.name);
    }
    let reply = frontends[2]
        .connect()
        .await
        .get("/counter/config?key=colour")
        .await
        .unwrap();
    assert_eq!(reply.body, "blue\n", "fe3 keeps what it has");
    controller.ok(&["server", "fe3", "deployment", "on"]);
    wait_all_answer(&frontends, "/counter/config?key=colour", "red\n").await;
    controller.ok(&["config", "unset", "counter", "greeting"]);
    wait_all_answer(
        &frontends,
        "/counter/config?key=greeting",
        "hello from the manifest of v2\n",
    )
    .await;
    let audit = controller.admin_get("/v1/audit").await;
    assert!(
        audit.contains("config-set") && audit.contains("config-unset"),
        "{audit}"
    );
}
