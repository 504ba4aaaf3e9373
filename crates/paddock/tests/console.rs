//! The console in headless Chromium: signing in (a wrong token refused, the `#token=` address
//! that `paddock up` prints), the environment health, draining a server and running a balanced
//! deployment from its buttons (each checked against the admin API, the facts the CLI reads),
//! a dead front-end and an unreachable controller shown as such.

mod harness;

use harness::{Balancer, Browser, Controller, Db, Frontend, fixture};

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_the_farm_and_drives_it() {
    let mut controller = Controller::start(Db::Sqlite, "console", &[]).await;
    let lb = Balancer::start(&controller, "lb1", &[]).await;
    let mut frontends = Vec::new();
    for name in ["fe1", "fe2"] {
        frontends.push(
            Frontend::builder(name)
                .controller(&controller, "default")
                .db(&controller)
                .start()
                .await,
        );
    }
    controller.ok(&["app", "publish", &fixture("hello-v1").display().to_string()]);
    controller.ok(&["app", "upload", &fixture("hello-v2").display().to_string()]);
    controller.ok(&[
        "app",
        "upload",
        &fixture("hello-broken").display().to_string(),
    ]);
    controller.ok(&[
        "app",
        "publish",
        &fixture("counter-v1").display().to_string(),
    ]);
    // Text from the API is shown as text, never read as HTML.
    let markup = "<img src=x id=injected>";
    controller.ok(&["config", "set", "hello", "motto", markup]);
    let console = format!("{}/", controller.url);

    // The page is the controller's own, and holds it to its own script and API.
    let page = reqwest::get(&console).await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert!(page.text().await.unwrap().contains("/console/console.js"));

    let browser = Browser::start().await;

    // Without a token: the sign-in form. A wrong token is refused, saying where the right one is.
    browser.goto(&console).await;
    browser
        .wait_text("#sign-in-form", |t| t.contains("Admin token"))
        .await;
    let field = browser
        .client
        .find(fantoccini::Locator::Css("#token"))
        .await
        .unwrap();
    field.send_keys("not-the-token").await.unwrap();
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .wait_text("#sign-in-error", |t| {
            t.contains("refused this admin token") && t.contains("admin.token")
        })
        .await;

    // The address `paddock up` prints signs in, and the token leaves the address bar.
    browser
        .goto(&format!("{console}#token={}", controller.admin_token))
        .await;
    browser
        .wait_text("[data-card=servers] .value", |t| t == "2/2")
        .await;
    browser
        .wait_text("[data-card=balancers] .value", |t| t == "1/1")
        .await;
    browser
        .wait_text("#all-well", |t| t.contains("Everything is as desired"))
        .await;
    assert!(
        !browser.url().await.contains("token="),
        "{}",
        browser.url().await
    );
    let row = browser
        .wait_text("tr[data-server=fe1] td[data-field=apps]", |t| {
            t.contains("hello@v1")
        })
        .await;
    assert!(!row.contains("v2"), "{row}");

    // Drain fe1 from the servers page: the controller records it, the balancer applies it.
    browser.goto(&format!("{console}#/servers")).await;
    browser
        .click("tr[data-server=fe1] button[data-action=lb-drain]")
        .await;
    browser
        .wait_text("tr[data-server=fe1] td[data-field=lb]", |t| {
            t.starts_with("drain") && t.contains("drained")
        })
        .await;
    let fe1: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/servers/fe1").await).unwrap();
    assert_eq!(fe1["lb"], "drain");
    browser
        .wait_text("#notice", |t| t.contains("fe1: lb drain"))
        .await;
    // The button for the state it is in is off; back to ready.
    assert!(
        !browser
            .enabled("tr[data-server=fe1] button[data-action=lb-drain]")
            .await
    );
    browser
        .click("tr[data-server=fe1] button[data-action=lb-ready]")
        .await;
    browser
        .wait_text("tr[data-server=fe1] td[data-field=lb]", |t| {
            t.starts_with("ready")
        })
        .await;
    let fe1: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/servers/fe1").await).unwrap();
    assert_eq!(fe1["lb"], "ready");

    // A balanced deployment of hello@v2 from the application's page: the console follows the
    // operation to its end, step by step.
    // With a watch step of 5 s, chosen on the page.
    browser.goto(&format!("{console}#/apps/hello")).await;
    browser
        .click("select[name=watch-ms] option[value='5000']")
        .await;
    browser
        .click("tr[data-version=v2] button[data-action=balanced-deploy]")
        .await;
    browser
        .wait_text("#operation-state", |t| t.starts_with("succeeded"))
        .await;
    assert!(browser.url().await.contains("#/operations/"));
    let notice = browser.text("#notice").await.unwrap_or_default();
    assert!(
        notice.contains("started: hello@v2") && notice.contains("watched for 5 s"),
        "{notice}"
    );
    let cutover = browser
        .wait_text("tr[data-step=cutover] td[data-field=state]", |t| {
            t == "done"
        })
        .await;
    assert_eq!(cutover, "done");
    let facts = browser
        .wait_text("tr[data-step=cutover] ul.facts", |t| !t.is_empty())
        .await;
    assert!(facts.contains("generation"), "{facts}");
    let facts = browser
        .wait_text("tr[data-step=watch] ul.facts", |t| !t.is_empty())
        .await;
    assert!(facts.contains("hello v2: no answer through lb1"), "{facts}");
    // Every step of the plan ran, the watch step with them.
    let states = browser.texts("tr[data-step] td[data-field=state]").await;
    assert_eq!(states.len(), 11, "{states:?}");
    assert!(states.iter().all(|s| s == "done"), "{states:?}");
    let operations: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/operations").await).unwrap();
    assert_eq!(operations[0]["state"], "succeeded", "{operations}");
    assert_eq!(operations[0]["kind"], "balanced-deploy");
    for fe in &frontends {
        assert_eq!(fe.serving("hello").await.as_deref(), Some("v2"));
    }
    browser.goto(&format!("{console}#/apps")).await;
    browser
        .wait_text("tr[data-app=hello] td[data-field=desired]", |t| t == "v2")
        .await;
    browser.goto(&format!("{console}#/apps/hello")).await;
    browser
        .wait_text("tr[data-config=motto] td[data-field=value]", |t| {
            t == markup
        })
        .await;
    assert!(browser.text("#injected").await.is_none());

    // A version failing its smoke test: the operation fails and puts everything back; the
    // steps it never ran are skipped, and the overview names it.
    browser
        .click("tr[data-version=v3-broken] button[data-action=balanced-deploy]")
        .await;
    browser
        .wait_text("#operation-state", |t| t.starts_with("failed"))
        .await;
    browser
        .wait_text("tr[data-step=smoke] td[data-field=state]", |t| {
            t == "failed"
        })
        .await;
    browser
        .wait_text("tr[data-step=cutover] td[data-field=state]", |t| {
            t == "skipped"
        })
        .await;
    // The steps that put everything back are listed after the plan's, as they ran.
    browser
        .wait_text("tr[data-step=restore-flags] td[data-field=state]", |t| {
            t == "done"
        })
        .await;
    let failed = browser.url().await;
    let failed = failed.rsplit('/').next().unwrap().to_string();
    browser.goto(&format!("{console}#/")).await;
    browser
        .wait_text("#problems", |t| {
            t.contains(&format!(
                "the last balanced-deploy, operation {failed}, failed"
            ))
        })
        .await;
    for fe in &frontends {
        assert_eq!(fe.serving("hello").await.as_deref(), Some("v2"));
    }

    // A purge of the counter's cached responses, applied by both front-ends, as they report.
    browser.goto(&format!("{console}#/apps/counter")).await;
    browser.click("button[data-action=purge-cache]").await;
    let notice = browser
        .wait_text("#notice", |t| t.starts_with("purge "))
        .await;
    let purge = notice
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("{notice}"));
    assert!(notice.contains("of counter"), "{notice}");
    browser.goto(&format!("{console}#/servers")).await;
    for fe in ["fe1", "fe2"] {
        browser
            .wait_text(
                &format!("tr[data-server={fe}] div[data-field=purged]"),
                |t| t.rsplit(' ').next().and_then(|n| n.parse::<i64>().ok()) >= Some(purge),
            )
            .await;
    }

    // A timer run from its button, and its run on the timer's page.
    browser.goto(&format!("{console}#/timers")).await;
    browser
        .click("tr[data-timer='counter/tick'] button[data-action=run-timer]")
        .await;
    browser
        .wait_text("#notice", |t| t.contains("is due now"))
        .await;
    browser
        .goto(&format!("{console}#/timers/counter/tick"))
        .await;
    browser
        .wait_text("tbody tr[data-run] td[data-field=outcome]", |t| t == "ok")
        .await;

    // The routing page shows each balancer's generation (at least the table's once applied);
    // the audit, who did what.
    let routing: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/routing").await).unwrap();
    let generation = routing["table"]["generation"].as_i64().unwrap();
    browser.goto(&format!("{console}#/routing")).await;
    browser
        .wait_text("#routing-applied", |t| {
            t.contains("applied by every live balancer")
        })
        .await;
    browser
        .wait_text("tr[data-balancer=lb1] td[data-field=generation]", |t| {
            t.parse::<i64>().is_ok_and(|g| g >= generation)
        })
        .await;
    // What each balancer answered for each app, as its reports count it: two requests more
    // through lb1 show up.
    let answered = |routing: &serde_json::Value| {
        routing["balancers"][0]["report"]["apps"]
            .as_array()
            .and_then(|apps| apps.iter().find(|a| a["app"] == "hello"))
            .and_then(|a| a["answered"].as_u64())
            .unwrap_or(0)
    };
    let before = answered(&routing);
    let mut conn = lb.connect().await;
    for _ in 0..2 {
        assert_eq!(conn.get("/hello/").await.unwrap().status, 200);
    }
    browser
        .wait_text(
            "tr[data-balancer=lb1] td[data-field=answers] div[data-app=hello]",
            |t| {
                t.strip_prefix("hello: ")
                    .and_then(|t| t.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    >= Some(before + 2)
            },
        )
        .await;
    let routing: serde_json::Value =
        serde_json::from_str(&controller.admin_get("/v1/routing").await).unwrap();
    assert!(answered(&routing) >= before + 2, "{routing:#}");

    // A standby controller following this one is listed with its process and build.
    let standby = controller.start_standby_following("ctl-b").await;
    browser.goto(&format!("{console}#/servers")).await;
    let row = browser
        .wait_text("tr[data-standby=ctl-b] td[data-field=state]", |t| {
            t.starts_with("standing by")
        })
        .await;
    assert!(row.contains("report"), "{row}");
    let platform = browser
        .text("tr[data-standby=ctl-b] td[data-field=platform]")
        .await
        .unwrap_or_default();
    assert!(
        platform.starts_with(env!("CARGO_PKG_VERSION")),
        "{platform}"
    );
    drop(standby);
    browser.goto(&format!("{console}#/audit")).await;
    browser
        .wait_text("main table", |t| {
            t.contains("server-lb") && t.contains("fe1 drain") && t.contains("balanced-deploy")
        })
        .await;

    // Pages that are not there say so.
    browser.goto(&format!("{console}#/operations/999")).await;
    browser
        .wait_text("#page-error", |t| t.contains("unknown_operation"))
        .await;
    browser.goto(&format!("{console}#/nowhere")).await;
    browser.wait_text("main h1", |t| t == "No such page").await;

    // A front-end killed: the overview names it.
    frontends[1].signal("KILL");
    browser.goto(&format!("{console}#/")).await;
    browser
        .wait_text("#problems", |t| t.contains("fe2 has sent no heartbeat"))
        .await;
    browser
        .wait_text("[data-card=servers] .value", |t| t == "1/2")
        .await;

    // The controller gone: the console says so and keeps the last figures on screen; back, and
    // it reads again.
    controller.kill();
    browser
        .wait_text("#updated", |t| t.contains("cannot reach the controller"))
        .await;
    assert!(
        browser
            .text("#problems")
            .await
            .is_some_and(|t| t.contains("fe2")),
        "the last figures stay"
    );
    controller.restart().await;
    browser
        .wait_text("#updated", |t| t.starts_with("updated"))
        .await;

    // Signed out, the tab keeps no token: a new load asks for one.
    browser.click("#sign-out").await;
    browser
        .wait_text("#sign-in-form", |t| t.contains("Admin token"))
        .await;
    browser.client.refresh().await.unwrap();
    browser
        .wait_text("#sign-in-form", |t| t.contains("Admin token"))
        .await;
    assert!(browser.text("[data-card=servers]").await.is_none());
    drop(lb);
}
