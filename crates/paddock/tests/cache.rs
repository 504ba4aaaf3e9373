//! The response cache end to end: the `counter` app's notes are cacheable (`Cache-Control`,
//! tag `note-KEY`), and writing a note purges its tag (`paddock-cache-purge`). Each front-end
//! keeps what it served; a purge, from an app's answer or from `paddock cache purge`, reaches
//! every front-end through the farm's database, with the controller down too.

mod harness;

use std::time::{Duration, Instant};

use harness::{Conn, Controller, Db, Frontend, Reply, fixture};

/// A controller on `db` and front-ends fe1, fe2 keeping app data (and reading purges) in its
/// database; counter@v1 published, counter@v2 uploaded.
async fn farm(test: &str, db: Db) -> (Controller, Vec<Frontend>) {
    let controller = Controller::start(db, test, &[]).await;
    let mut frontends = Vec::new();
    for i in 1..=2 {
        frontends.push(
            Frontend::builder(&format!("fe{i}"))
                .controller(&controller, "default")
                .db(&controller)
                .start()
                .await,
        );
    }
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
    (controller, frontends)
}

/// What a note's answer says, and whether the cache sent it: (value, the app's read count,
/// `hit`/`miss`/`-`).
async fn note(conn: &mut Conn, key: &str) -> (String, u64, String) {
    let reply = conn.get(&format!("/counter/note?key={key}")).await.unwrap();
    parse_note(&reply, key)
}

fn parse_note(reply: &Reply, key: &str) -> (String, u64, String) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("paddock-cache-tag"),
        None,
        "tags stay on the server"
    );
    assert_eq!(reply.header("x-paddock-app"), Some("counter"));
    let rest = reply
        .body
        .trim()
        .strip_prefix(&format!("note {key}="))
        .unwrap_or_else(|| panic!("{}", reply.body));
    let (value, reads) = rest.split_once(" reads=").unwrap();
    (
        value.to_string(),
        reads.parse().unwrap(),
        reply.header("x-paddock-cache").unwrap_or("-").to_string(),
    )
}

async fn put(conn: &mut Conn, key: &str, value: &str) {
    let reply = conn
        .get(&format!("/counter/put?key={key}&value={value}"))
        .await
        .unwrap();
    assert_eq!(reply.body, "stored\n");
    assert_eq!(
        reply.header("paddock-cache-purge"),
        None,
        "purges stay on the server"
    );
}

/// Waits, a bounded time, until `conn` answers `key` with `value`.
async fn until_note(conn: &mut Conn, key: &str, value: &str) -> (String, u64, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = note(conn, key).await;
        if seen.0 == value {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{key} still {seen:?}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every front-end reports the whole purge log read: purges written by an app
/// on one front-end reach the others a poll later, and until then drop what they keep.
async fn settled(controller: &Controller) {
    let last = controller.store().await.cache_purge_last().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status: serde_json::Value = serde_json::from_str(
            &controller
                .cli_async(&["cache", "status", "--json"])
                .await
                .stdout,
        )
        .unwrap();
        let behind: Vec<_> = status
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r[1]["purged"].as_i64().unwrap() < last)
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "purge {last} not applied: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the cache answers `key` on `conn` now (and a miss puts it there).
async fn cached(conn: &mut Conn, key: &str) -> bool {
    note(conn, key).await.2 == "hit"
}

async fn responses_are_cached_and_purged_farm_wide(test: &str, db: Db) {
    let (mut controller, frontends) = farm(test, db).await;
    let mut fe1 = frontends[0].connect().await;
    let mut fe2 = frontends[1].connect().await;
    put(&mut fe1, "a", "1").await;
    settled(&controller).await;

    // The first read runs the app and is kept; the next ones come from the cache, with their age.
    let (value, reads, status) = note(&mut fe1, "a").await;
    assert_eq!((value.as_str(), status.as_str()), ("1", "miss"));
    let reply = fe1.get("/counter/note?key=a").await.unwrap();
    assert_eq!(parse_note(&reply, "a"), ("1".into(), reads, "hit".into()));
    assert!(reply.header("age").is_some());
    assert_eq!(reply.header("x-paddock-version"), Some("v1"));
    assert_eq!(reply.header("cache-control"), Some("public, max-age=60"));
    // A hit says its own request's id, not the one of the request whose answer was kept.
    let again = fe1
        .get_with("/counter/note?key=a", &[("x-request-id", "edge-1")])
        .await
        .unwrap();
    assert_eq!(again.header("x-paddock-cache"), Some("hit"));
    assert_eq!(again.header("x-request-id"), Some("edge-1"));
    let own = reply.header("x-request-id").unwrap();
    let next = fe1.get("/counter/note?key=a").await.unwrap();
    assert_eq!(next.header("x-paddock-cache"), Some("hit"));
    assert!(
        next.header("x-request-id")
            .is_some_and(|id| id != own && id != "edge-1")
    );
    // A HEAD is answered from the GET's entry: the same head, no body.
    let head = fe1.head("/counter/note?key=a").await.unwrap();
    assert_eq!(head.header("x-paddock-cache"), Some("hit"));
    assert_eq!(
        head.header("content-length"),
        reply.header("content-length")
    );
    assert_eq!(head.body, "");
    // Each front-end keeps its own.
    let (_, fe2_reads, status) = note(&mut fe2, "a").await;
    assert_eq!((fe2_reads, status.as_str()), (reads + 1, "miss"));
    assert!(cached(&mut fe2, "a").await);
    // An answer with a Content-Length is kept too (hyper does not poll the end of such a body).
    let sized = fe1.get("/counter/note?key=a&sized=1").await.unwrap();
    assert!(sized.header("content-length").is_some());
    let (_, sized_reads, status) = parse_note(&sized, "a");
    assert_eq!(status, "miss");
    let again = fe1.get("/counter/note?key=a&sized=1").await.unwrap();
    assert_eq!(
        parse_note(&again, "a"),
        ("1".into(), sized_reads, "hit".into())
    );
    let reads = sized_reads - 1;
    // A request with credentials is the app's to answer.
    let reply = fe1
        .get_with("/counter/note?key=a", &[("authorization", "Bearer x")])
        .await
        .unwrap();
    let (_, auth_reads, status) = parse_note(&reply, "a");
    assert_eq!((auth_reads, status.as_str()), (reads + 2, "-"));
    // So is one of a user with a session in the app.
    let reply = fe1
        .get_with(
            "/counter/note?key=a",
            &[(
                "cookie",
                "paddock_session_counter=0123456789abcdef0123456789abcdef",
            )],
        )
        .await
        .unwrap();
    let (_, user_reads, status) = parse_note(&reply, "a");
    assert_eq!((user_reads, status.as_str()), (reads + 3, "-"));
    assert!(cached(&mut fe1, "a").await);
    // Answers the app does not mark cacheable are not kept.
    let first = fe1.get("/counter/get?key=a").await.unwrap();
    assert_eq!(first.header("x-paddock-cache"), None);

    // An app's write purges its tag: on the front-end that ran it at once, on the others
    // through the purge log.
    put(&mut fe1, "a", "2").await;
    let (value, _, status) = note(&mut fe1, "a").await;
    assert_eq!((value.as_str(), status.as_str()), ("2", "miss"));
    let (_, _, status) = until_note(&mut fe2, "a", "2").await;
    assert_eq!(status, "miss");

    // `paddock cache purge --tag` returns once every front-end applied it.
    put(&mut fe1, "b", "1").await;
    settled(&controller).await;
    for conn in [&mut fe1, &mut fe2] {
        for key in ["a", "b"] {
            note(conn, key).await;
            assert!(cached(conn, key).await, "{key}");
        }
    }
    let out = controller.ok(&["cache", "purge", "counter", "--tag", "note-b"]);
    assert!(out.contains("tag(s) note-b"), "{out}");
    assert!(out.contains("applied by 2 front-end(s)"), "{out}");
    for conn in [&mut fe1, &mut fe2] {
        assert!(!cached(conn, "b").await, "note-b was purged");
        let a = note(conn, "a").await;
        assert_eq!(a.2, "hit", "note-a was not purged: {a:?}");
    }
    // Without a tag: all of the app's responses.
    let out = controller.ok(&["cache", "purge", "counter"]);
    assert!(out.contains("every cached response"), "{out}");
    for conn in [&mut fe1, &mut fe2] {
        assert!(!cached(conn, "a").await);
    }

    // Bad input changes nothing.
    let before = controller.ok(&["cache", "status", "--json"]);
    let err = controller.fails(&["cache", "purge", "nosuchapp"]);
    assert!(err.contains("unknown app"), "{err}");
    let err = controller.fails(&["cache", "purge", "counter", "--tag", "a b"]);
    assert!(err.contains("cache tag \"a b\""), "{err}");
    let err = controller.fails(&["cache", "purge", "counter", "--tag", "*"]);
    assert!(err.contains("without a tag"), "{err}");
    let after = controller.ok(&["cache", "status", "--json"]);
    let purged = |json: &str| -> Vec<i64> {
        let reports: serde_json::Value = serde_json::from_str(json).unwrap();
        reports
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[1]["purged"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(purged(&before), purged(&after));
    let status = controller.ok(&["cache", "status"]);
    assert!(status.contains("fe1") && status.contains("fe2"), "{status}");
    assert!(!status.contains("off"), "{status}");

    // A new version never meets the old one's responses.
    assert!(cached(&mut fe1, "a").await);
    controller.ok(&["deploy", "counter@v2"]);
    frontends[0]
        .wait_serving("counter", "v2", "/counter/")
        .await;
    let reply = fe1.get("/counter/note?key=a").await.unwrap();
    assert_eq!(reply.header("x-paddock-version"), Some("v2"));
    assert_eq!(reply.header("x-paddock-cache"), Some("miss"));
    frontends[1]
        .wait_serving("counter", "v2", "/counter/")
        .await;

    // With the controller down, an app's purge still reaches every front-end.
    note(&mut fe2, "c").await;
    assert!(cached(&mut fe2, "c").await);
    controller.kill();
    put(&mut fe1, "c", "9").await;
    let (_, _, status) = until_note(&mut fe2, "c", "9").await;
    assert_eq!(status, "miss");
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_cached_and_purged_farm_wide_on_sqlite() {
    responses_are_cached_and_purged_farm_wide("cache_sqlite", Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_cached_and_purged_farm_wide_on_postgres() {
    responses_are_cached_and_purged_farm_wide("cache_postgres", Db::Postgres).await;
}

/// A front-end on its own keeps a cache too: with its own database, it follows that database's
/// purge log; with `--cache-mib 0` it keeps nothing; and a farm's front-end without `--db`
/// keeps nothing, saying why (it could not learn of purges).
#[tokio::test(flavor = "multi_thread")]
async fn a_front_end_alone_and_one_without_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let own = format!("sqlite://{}", dir.path().join("own.db").display());
    let alone = Frontend::builder("alone")
        .package("counter-v1", "counter")
        .arg("--db")
        .arg(&own)
        .start()
        .await;
    alone.wait_serving("counter", "v1", "/counter/").await;
    let mut conn = alone.connect().await;
    put(&mut conn, "k", "1").await;
    assert_eq!(note(&mut conn, "k").await.2, "miss");
    assert!(cached(&mut conn, "k").await);
    // Its app's purge drops it at once.
    put(&mut conn, "k", "2").await;
    let (value, _, status) = note(&mut conn, "k").await;
    assert_eq!((value.as_str(), status.as_str()), ("2", "miss"));
    assert!(cached(&mut conn, "k").await);
    // A purge another process writes to its database's log reaches it.
    let store = paddock_store::SqlStore::open_data(&own).await.unwrap();
    store
        .cache_purge_add("counter", &["note-k".to_string()], "admin")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cached(&mut conn, "k").await {
        assert!(
            Instant::now() < deadline,
            "the purge in the log was not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let off = Frontend::builder("off")
        .package("counter-v1", "counter")
        .arg("--db")
        .arg(&own)
        .arg("--cache-mib")
        .arg("0")
        .start()
        .await;
    off.wait_serving("counter", "v1", "/counter/").await;
    let mut conn = off.connect().await;
    for _ in 0..2 {
        assert_eq!(note(&mut conn, "k").await.2, "-");
    }

    let controller = Controller::start(Db::Sqlite, "cache_without_db", &[]).await;
    let farm = Frontend::builder("nodb")
        .controller(&controller, "default")
        .start()
        .await;
    farm.wait_for_log("response cache off", Duration::from_secs(10))
        .await;
    let status = controller.ok(&["cache", "status"]);
    assert!(status.contains("keeps no response cache"), "{status}");
}
