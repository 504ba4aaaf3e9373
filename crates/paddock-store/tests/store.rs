//! The store's behaviour, run against both backends: SQLite always, PostgreSQL at the URL in
//! `PADDOCK_TEST_POSTGRES` (scripts/test.sh starts a throw-away cluster and sets it). Without that
//! variable the PostgreSQL tests fail, unless `PADDOCK_TEST_SKIP_POSTGRES=1` says to skip them.

use paddock_api::{
    BalancerReport, HealthReport, LbState, Policy, Registration, Role, RouteEntry, ServerFlag,
    ServerState,
};
use paddock_api::{DeployPlan, OpState, Step, StepState, TimerFinish, TimerLease, ZonePlan};
use paddock_core::Manifest;
use paddock_core::TimerSchedule;
use paddock_store::{PutOutcome, ServerChange, SqlStore, StepEnd, Store, StoreError, TimerDef};

enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty store of the given backend. The guard keeps its files alive.
async fn fresh(backend: Backend, test: &str) -> Option<(SqlStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}", dir.path().join("paddock.db").display());
            SqlStore::open(&url).await.unwrap()
        }
        Backend::Postgres => {
            let Ok(base) = std::env::var("PADDOCK_TEST_POSTGRES") else {
                if std::env::var("PADDOCK_TEST_SKIP_POSTGRES").as_deref() == Ok("1") {
                    eprintln!("SKIPPED on PostgreSQL: PADDOCK_TEST_SKIP_POSTGRES=1");
                    return None;
                }
                panic!(
                    "PADDOCK_TEST_POSTGRES is not set: run scripts/test.sh (it starts PostgreSQL), \
                     or set PADDOCK_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL half"
                );
            };
            let db = format!("t_{}_{}", test, std::process::id());
            let admin = SqlStore::open(&base).await.unwrap();
            admin
                .execute_raw(&format!("DROP DATABASE IF EXISTS {db}"))
                .await
                .unwrap();
            admin
                .execute_raw(&format!("CREATE DATABASE {db}"))
                .await
                .unwrap();
            let (prefix, _) = base.rsplit_once('/').unwrap();
            SqlStore::open(&format!("{prefix}/{db}")).await.unwrap()
        }
    };
    Some((store, dir))
}

fn registration(name: &str, zone: &str) -> Registration {
    Registration {
        name: name.into(),
        zone: zone.into(),
        address: "127.0.0.1:9000".into(),
        platform_version: "0.1.0".into(),
        engine: "e1".into(),
        incarnation: None,
    }
}

fn manifest(name: &str, zone: &str) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"{name}\"\ncomponent = \"{name}.wasm\"\nzone = \"{zone}\"\n"
    ))
    .unwrap()
}

async fn servers_and_flags(store: &dyn Store) {
    let g0 = store.generation().await.unwrap();
    let s = store
        .register_server(&registration("fe1", "default"), 1000)
        .await
        .unwrap();
    assert_eq!(
        (s.role, s.deployment, s.scheduler),
        (Role::Active, true, true)
    );
    assert_eq!(s.heartbeat_ms, None);

    let g1 = store
        .set_flag("fe1", ServerFlag::Deployment, false)
        .await
        .unwrap();
    assert!(g1 > g0, "a flag change bumps the generation");
    // Registering again (a restart) keeps the flags and updates the address.
    let mut again = registration("fe1", "default");
    again.address = "127.0.0.1:9001".into();
    let s = store.register_server(&again, 2000).await.unwrap();
    assert_eq!(
        (s.deployment, s.address.as_str()),
        (false, "127.0.0.1:9001")
    );

    let report = HealthReport {
        server: "fe1".into(),
        state: ServerState::Serving,
        apps: vec![],
        in_flight: 3,
        failed: vec![],
        build: None,
        upgrade_error: None,
        installing: None,
        incarnation: None,
        cache: None,
    };
    store.heartbeat("fe1", &report, 3000).await.unwrap();
    let s = store.server("fe1").await.unwrap();
    assert_eq!(s.heartbeat_ms, Some(3000));
    assert_eq!(s.observed, Some(report.clone()));

    // Unknown servers are refused and change nothing.
    let g = store.generation().await.unwrap();
    for err in [
        store
            .set_flag("nope", ServerFlag::Scheduler, false)
            .await
            .unwrap_err(),
        store.remove_server("nope").await.unwrap_err(),
        store.heartbeat("nope", &report, 1).await.unwrap_err(),
        store.server("nope").await.unwrap_err(),
    ] {
        assert!(
            matches!(err, StoreError::UnknownServer(ref n) if n == "nope"),
            "{err}"
        );
        assert!(err.to_string().contains("paddock servers"), "{err}");
    }
    assert_eq!(store.generation().await.unwrap(), g);

    store
        .register_server(&registration("fe2", "eu"), 1000)
        .await
        .unwrap();
    let names: Vec<_> = store
        .servers()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["fe1", "fe2"]);
    assert!(store.remove_server("fe1").await.unwrap() > g);
    assert_eq!(store.servers().await.unwrap().len(), 1);
}

async fn versions_are_immutable(store: &dyn Store) {
    let m = manifest("hello", "default");
    assert_eq!(
        store
            .put_version(&m, "v1", b"one", "sha-one", 10)
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store
            .put_version(&m, "v1", b"one", "sha-one", 11)
            .await
            .unwrap(),
        PutOutcome::Unchanged
    );
    let err = store
        .put_version(&m, "v1", b"two", "sha-two", 12)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert!(err.to_string().contains("immutable"), "{err}");
    assert_eq!(
        store
            .put_version(&m, "v2", b"two", "sha-two", 20)
            .await
            .unwrap(),
        PutOutcome::Created
    );
    // The same app in another zone is refused.
    let err = store
        .put_version(&manifest("hello", "eu"), "v3", b"three", "sha-three", 30)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ZoneConflict { .. }), "{err}");

    let versions: Vec<_> = store
        .versions("hello")
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, ["v1", "v2"]);
    assert_eq!(
        store.component("sha-two").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        store.component("sha-three").await.unwrap(),
        None,
        "a refused version stores nothing"
    );
    let v = store.version("hello", "v2").await.unwrap();
    assert_eq!(v.manifest, m);
    assert!(matches!(
        store.version("hello", "v9").await.unwrap_err(),
        StoreError::UnknownVersion { .. }
    ));

    // Uploads of one new version at once (a retried CI job): one creates it, the others find
    // it there, none fails.
    let m = manifest("race", "default");
    let put = |at| store.put_version(&m, "v1", b"race", "sha-race", at);
    let (a, b, c, d) = tokio::join!(put(40), put(41), put(42), put(43));
    let outcomes = [a, b, c, d];
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(PutOutcome::Created)))
        .count();
    let unchanged = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(PutOutcome::Unchanged)))
        .count();
    assert_eq!((created, unchanged), (1, 3), "{outcomes:?}");
}

async fn desired_state_per_zone(store: &dyn Store) {
    store
        .put_version(&manifest("hello", "default"), "v1", b"1", "s1", 1)
        .await
        .unwrap();
    store
        .put_version(&manifest("hello", "default"), "v2", b"2", "s2", 2)
        .await
        .unwrap();
    store
        .put_version(&manifest("shop", "eu"), "v1", b"3", "s3", 3)
        .await
        .unwrap();
    let g0 = store.generation().await.unwrap();
    let g1 = store
        .set_desired("hello", "default", "v1", 5)
        .await
        .unwrap();
    let g2 = store
        .set_desired("hello", "default", "v2", 6)
        .await
        .unwrap();
    assert!(g0 < g1 && g1 < g2);
    store.set_desired("shop", "eu", "v1", 7).await.unwrap();

    let default: Vec<_> = store
        .desired("default")
        .await
        .unwrap()
        .into_iter()
        .map(|v| format!("{}@{}", v.app, v.version))
        .collect();
    assert_eq!(default, ["hello@v2"]);
    assert_eq!(store.desired("eu").await.unwrap()[0].app, "shop");

    // A version that does not exist (or not in that zone) is refused and changes nothing.
    let g = store.generation().await.unwrap();
    assert!(
        store
            .set_desired("hello", "default", "v9", 8)
            .await
            .is_err()
    );
    assert!(store.set_desired("shop", "default", "v1", 8).await.is_err());
    assert_eq!(store.generation().await.unwrap(), g);

    let apps = store.apps().await.unwrap();
    assert_eq!(apps.len(), 2);
    assert_eq!(
        (
            apps[0].name.as_str(),
            apps[0].versions,
            apps[0].latest.as_str()
        ),
        ("hello", 2, "v2")
    );
    assert_eq!(apps[0].desired.as_deref(), Some("v2"));

    // A route is one app's in the whole farm, across zones too: the balancers route by path
    // first. Refused, naming both apps, and nothing changes.
    let greeter = Manifest::from_toml(
        "name = \"greeter\"\ncomponent = \"g.wasm\"\nzone = \"eu\"\nroute = \"/hello\"\n",
    )
    .unwrap();
    store
        .put_version(&greeter, "v1", b"4", "s4", 9)
        .await
        .unwrap();
    match store.set_desired("greeter", "eu", "v1", 10).await {
        Err(e @ StoreError::RouteTaken { .. }) => {
            let message = e.to_string();
            assert!(
                message
                    .contains("route /hello of greeter@v1 is the route of hello@v2 (zone default)"),
                "{message}"
            );
        }
        other => panic!("expected RouteTaken, got {other:?}"),
    }
    assert_eq!(store.generation().await.unwrap(), g);
    assert_eq!(store.desired("eu").await.unwrap().len(), 1);
}

async fn artifacts_and_audit(store: &dyn Store) {
    assert_eq!(store.artifact("c1", "e1").await.unwrap(), None);
    store
        .put_artifact("c1", "e1", "a1", b"native")
        .await
        .unwrap();
    store
        .put_artifact("c1", "e2", "a2", b"other")
        .await
        .unwrap();
    assert_eq!(
        store.artifact("c1", "e1").await.unwrap(),
        Some(("a1".to_string(), b"native".to_vec()))
    );
    assert_eq!(
        store.artifact_sha256("c1", "e2").await.unwrap().as_deref(),
        Some("a2")
    );

    store
        .audit("admin", "publish", "hello@v1", 1)
        .await
        .unwrap();
    store
        .audit("admin", "rollback", "hello@v1", 2)
        .await
        .unwrap();
    let log = store.audit_log(10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].action, "rollback", "newest first");
}

macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _dir) = super::fresh(super::Backend::Sqlite, stringify!($name)).await.unwrap();
                    super::$name(&store).await;
                    // Opening again applies no migration twice and keeps the data.
                    drop(store);
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some((store, _dir)) = super::fresh(super::Backend::Postgres, stringify!($name)).await {
                        super::$name(&store).await;
                    }
                }
            )*
        }
    };
}

async fn routing_state(store: &dyn Store) {
    let g0 = store.generation().await.unwrap();
    let s = store
        .register_server(&registration("fe1", "default"), 1000)
        .await
        .unwrap();
    assert_eq!((s.lb, s.weight), (LbState::Ready, 1));
    let g1 = store.generation().await.unwrap();
    assert!(g1 > g0, "a registration changes the routing table");

    let g2 = store.set_lb("fe1", LbState::Drain, None).await.unwrap();
    assert!(g2 > g1);
    let s = store.server("fe1").await.unwrap();
    assert_eq!((s.lb, s.weight), (LbState::Drain, 1));
    store.set_lb("fe1", LbState::Ready, Some(5)).await.unwrap();
    let s = store.server("fe1").await.unwrap();
    assert_eq!((s.lb, s.weight), (LbState::Ready, 5));
    // A restart keeps the routing state.
    let s = store
        .register_server(&registration("fe1", "default"), 2000)
        .await
        .unwrap();
    assert_eq!(s.weight, 5);
    let g = store.generation().await.unwrap();
    assert!(matches!(
        store.set_lb("nope", LbState::Maint, None).await,
        Err(StoreError::UnknownServer(_))
    ));
    assert_eq!(store.generation().await.unwrap(), g);

    assert!(store.zone_policies().await.unwrap().is_empty());
    assert!(store.set_zone_policy("eu", Policy::Ratio).await.unwrap() > g);
    store
        .set_zone_policy("eu", Policy::LeastConnections)
        .await
        .unwrap();
    assert_eq!(
        store.zone_policies().await.unwrap(),
        [("eu".to_string(), Policy::LeastConnections)]
    );

    // Routes are those of the desired versions.
    assert!(store.routes().await.unwrap().is_empty());
    let m = manifest("hello", "default");
    store
        .put_version(&m, "v1", b"c1", &"a".repeat(64), 1)
        .await
        .unwrap();
    assert!(store.routes().await.unwrap().is_empty(), "not deployed yet");
    store
        .set_desired("hello", "default", "v1", 2)
        .await
        .unwrap();
    let routes = store.routes().await.unwrap();
    assert_eq!(
        routes,
        [RouteEntry {
            prefix: "/hello".into(),
            app: "hello".into(),
            zone: "default".into()
        }]
    );

    // Balancer acknowledgements: applied_ms moves with the generation only.
    let mut report = BalancerReport {
        name: "lb1".into(),
        listen: "127.0.0.1:8080".into(),
        admin: None,
        generation: 7,
        upstreams: vec![],
        platform: Default::default(),
        apps: Some(vec![paddock_api::AppTraffic {
            app: "hello".into(),
            counts: paddock_api::AppTrafficCounts {
                answered: 12,
                failed: 1,
            },
        }]),
        started_ms: 42,
    };
    store.balancer_report(&report, 100).await.unwrap();
    store.balancer_report(&report, 200).await.unwrap();
    let b = &store.balancers(150).await.unwrap()[0];
    assert_eq!((b.applied_ms, b.heartbeat_ms, b.alive), (100, 200, true));
    report.generation = 8;
    store.balancer_report(&report, 300).await.unwrap();
    let b = &store.balancers(400).await.unwrap()[0];
    assert_eq!(
        (b.report.generation, b.applied_ms, b.alive),
        (8, 300, false)
    );
    // Its counts of answers come back whole: the watch step reads them there.
    assert_eq!(b.report, report);
}

/// Operations: zone locks, the journal, final states; and the multi-server and multi-app writes
/// they make in one transaction each.
async fn operations_journal(store: &dyn Store) {
    for (name, zone) in [("fe1", "a"), ("fe2", "a"), ("fe3", "b")] {
        store
            .register_server(&registration(name, zone), 1)
            .await
            .unwrap();
    }
    let plan = |zones: &[&str]| DeployPlan {
        platform: None,
        watch: None,
        parallel_zones: false,
        timeout_ms: 1000,
        zones: zones
            .iter()
            .map(|z| ZonePlan {
                zone: z.to_string(),
                apps: vec![],
                updating: vec![],
                loaded: vec![],
                untouched: vec![],
                in_place: false,
                before: vec![],
                steps: vec![],
            })
            .collect(),
    };
    let id = store
        .create_operation("balanced-deploy", &plan(&["a"]), None, 10)
        .await
        .unwrap();
    assert_eq!(store.zone_lock("a").await.unwrap(), Some(id));
    // A front-end new to a zone an operation holds joins in drain with its scheduler off (no
    // tick runs there while versions are mixed); a known one keeps its state.
    let joined = store
        .register_server(&registration("fe9", "a"), 12)
        .await
        .unwrap();
    assert_eq!((joined.lb, joined.scheduler), (LbState::Drain, false));
    let back = store
        .register_server(&registration("fe1", "a"), 12)
        .await
        .unwrap();
    assert_eq!((back.lb, back.scheduler), (LbState::Ready, true));
    assert_eq!(store.zone_lock("b").await.unwrap(), None);
    // A second operation on zone a is refused and leaves nothing behind, not even b's lock.
    match store
        .create_operation("balanced-deploy", &plan(&["b", "a"]), None, 11)
        .await
    {
        Err(StoreError::ZoneBusy { zone, operation }) => {
            assert_eq!((zone.as_str(), operation), ("a", id))
        }
        other => panic!("expected ZoneBusy, got {other:?}"),
    }
    assert_eq!(store.zone_lock("b").await.unwrap(), None);
    assert_eq!(store.operations(10).await.unwrap().len(), 1);
    assert_eq!(store.running_operations().await.unwrap(), vec![id]);

    let servers = vec!["fe1".to_string()];
    store
        .step_started(id, "a", Step::SchedulerOff, &servers, 20)
        .await
        .unwrap();
    let facts = vec!["scheduler off on fe1".to_string()];
    store
        .step_ended(
            id,
            "a",
            Step::SchedulerOff,
            StepEnd {
                state: StepState::Done,
                facts: &facts,
                message: None,
            },
            25,
        )
        .await
        .unwrap();
    store
        .step_started(id, "a", Step::DrainUpdating, &servers, 30)
        .await
        .unwrap();
    // Started again after a restart: same record, one more attempt, first start kept.
    store
        .step_started(id, "a", Step::DrainUpdating, &servers, 40)
        .await
        .unwrap();
    store.request_abort(id, 41).await.unwrap();
    let op = store.operation(id).await.unwrap();
    assert!(op.abort_requested);
    assert_eq!(op.state, OpState::Running);
    assert_eq!(op.zones, ["a"]);
    assert_eq!(op.plan, plan(&["a"]));
    let steps: Vec<_> = op
        .steps
        .iter()
        .map(|s| (s.step, s.state, s.started_ms, s.attempts))
        .collect();
    assert_eq!(
        steps,
        [
            (Step::SchedulerOff, StepState::Done, 20, 1),
            (Step::DrainUpdating, StepState::Running, 30, 2)
        ]
    );
    assert_eq!(op.steps[0].facts, facts);
    assert_eq!(op.steps[0].ended_ms, Some(25));

    store
        .set_operation_state(id, OpState::Aborted, Some("aborted by the operator"), 50)
        .await
        .unwrap();
    let op = store.operation(id).await.unwrap();
    assert_eq!((op.state, op.ended_ms), (OpState::Aborted, Some(50)));
    assert_eq!(op.message.as_deref(), Some("aborted by the operator"));
    assert_eq!(
        store.zone_lock("a").await.unwrap(),
        None,
        "a final state releases the zone"
    );
    assert!(store.running_operations().await.unwrap().is_empty());
    assert!(matches!(
        store.operation(999).await,
        Err(StoreError::UnknownOperation(999))
    ));

    // Several servers in one generation; an unknown one refuses all of it.
    let g = store.generation().await.unwrap();
    let change = |name: &str, lb| ServerChange {
        name: name.into(),
        lb: Some(lb),
        deployment: Some(false),
        scheduler: None,
        platform_target: None,
    };
    let g1 = store
        .set_servers(&[change("fe1", LbState::Drain), change("fe2", LbState::Maint)])
        .await
        .unwrap();
    assert_eq!(g1, g + 1);
    let fe2 = store.server("fe2").await.unwrap();
    assert_eq!(
        (fe2.lb, fe2.deployment, fe2.scheduler),
        (LbState::Maint, false, true)
    );
    assert!(matches!(
        store
            .set_servers(&[
                change("fe3", LbState::Drain),
                change("nope", LbState::Drain)
            ])
            .await,
        Err(StoreError::UnknownServer(_))
    ));
    assert_eq!(store.server("fe3").await.unwrap().lb, LbState::Ready);
    assert_eq!(store.generation().await.unwrap(), g1);

    // Several desired versions in one generation; an unknown version refuses all of them.
    store
        .put_version(&manifest("x", "a"), "v1", b"x1", "sha-x1", 1)
        .await
        .unwrap();
    store
        .put_version(&manifest("y", "a"), "v1", b"y1", "sha-y1", 1)
        .await
        .unwrap();
    let g2 = store
        .set_desired_many(&[("x", "a", "v1"), ("y", "a", "v1")], 60)
        .await
        .unwrap();
    assert_eq!(g2, g1 + 1);
    assert_eq!(store.desired("a").await.unwrap().len(), 2);
    store
        .put_version(&manifest("x", "a"), "v2", b"x2", "sha-x2", 1)
        .await
        .unwrap();
    assert!(matches!(
        store
            .set_desired_many(&[("x", "a", "v2"), ("y", "a", "v9")], 70)
            .await,
        Err(StoreError::UnknownVersion { .. })
    ));
    let x = store
        .desired("a")
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.app == "x")
        .unwrap();
    assert_eq!(x.version, "v1");
}

/// Timers: claims with a lease and a fencing token, retries after an expired lease, one
/// catch-up run after a pause, nothing for a server whose scheduler is off.
async fn timer_claims(store: &dyn Store) {
    for name in ["fe1", "fe2"] {
        store
            .register_server(&registration(name, "default"), 1)
            .await
            .unwrap();
    }
    let def = TimerDef {
        app: "a".into(),
        timer: "t".into(),
        zone: "default".into(),
        version: "v1".into(),
        schedule: TimerSchedule::Every(std::time::Duration::from_secs(1)),
        path: "/a/t".into(),
    };
    store
        .sync_timers(std::slice::from_ref(&def), 10_000)
        .await
        .unwrap();
    let serving = vec![("a".to_string(), "v1".to_string())];
    // A server that does not serve the timer's version claims nothing.
    let other = vec![("a".to_string(), "v0".to_string())];
    assert!(
        store
            .claim_timers("fe1", &other, 11_000, 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_timers("fe1", &serving, 10_500, 5000, 10)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    // A passive server claims nothing, its scheduler flag on or not.
    let g = store.generation().await.unwrap();
    assert!(store.set_roles(&[("fe1", Role::Passive)]).await.unwrap() > g);
    assert_eq!(store.server("fe1").await.unwrap().role, Role::Passive);
    assert!(store.server("fe1").await.unwrap().scheduler);
    assert!(
        store
            .claim_timers("fe1", &serving, 11_000, 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store
            .set_roles(&[("fe1", Role::Active), ("nope", Role::Active)])
            .await,
        Err(StoreError::UnknownServer(_))
    ));
    assert_eq!(
        store.server("fe1").await.unwrap().role,
        Role::Passive,
        "a refused change changes nothing"
    );
    store.set_roles(&[("fe1", Role::Active)]).await.unwrap();
    let claims = store
        .claim_timers("fe1", &serving, 11_000, 5000, 10)
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    let first = &claims[0];
    assert_eq!(
        (first.tick_ms, first.retry, first.lease_until_ms),
        (11_000, false, 16_000)
    );
    // Held by fe1: nobody else gets it, even when the next tick is due.
    assert!(
        store
            .claim_timers("fe2", &serving, 12_500, 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // fe1 goes silent: after its lease, fe2 runs the same tick again, as a retry.
    let retry = store
        .claim_timers("fe2", &serving, 16_001, 5000, 10)
        .await
        .unwrap();
    assert_eq!(retry.len(), 1);
    assert_eq!((retry[0].tick_ms, retry[0].retry), (11_000, true));
    assert!(retry[0].fencing > first.fencing);
    // fe1's late end changes nothing: its fencing token is stale.
    let stale = TimerFinish {
        lease: TimerLease {
            app: "a".into(),
            timer: "t".into(),
            fencing: first.fencing,
        },
        ok: true,
        detail: "late".into(),
    };
    assert!(!store.finish_timer("fe1", &stale, 16_100).await.unwrap());
    let done = TimerFinish {
        lease: TimerLease {
            fencing: retry[0].fencing,
            ..stale.lease.clone()
        },
        ok: true,
        detail: "200".into(),
    };
    store
        .renew_timers("fe2", std::slice::from_ref(&done.lease), 30_000)
        .await
        .unwrap();
    assert_eq!(
        store.timers().await.unwrap()[0].lease_until_ms,
        Some(30_000)
    );
    assert!(store.finish_timer("fe2", &done, 16_200).await.unwrap());
    let runs = store.timer_runs("a", "t", 10).await.unwrap();
    let outcomes: Vec<(&str, &str, bool)> = runs
        .iter()
        .map(|r| (r.server.as_str(), r.outcome.as_str(), r.retry))
        .collect();
    assert_eq!(outcomes, [("fe2", "ok", true), ("fe1", "lost", false)]);
    // Ticks missed until 20_500 collapse into one run, then the schedule goes on.
    let catch_up = store
        .claim_timers("fe2", &serving, 20_500, 5000, 10)
        .await
        .unwrap();
    assert_eq!(catch_up[0].tick_ms, 12_000);
    assert_eq!(store.timers().await.unwrap()[0].next_ms, 21_000);
    // Scheduler off: no claim, even of a due tick.
    store
        .set_flag("fe1", ServerFlag::Scheduler, false)
        .await
        .unwrap();
    store.run_timer_now("a", "t", 20_600).await.unwrap();
    assert!(
        store
            .claim_timers("fe1", &serving, 40_000, 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.run_timer_now("a", "nope", 1).await,
        Err(StoreError::UnknownTimer { .. })
    ));
    // A timer no longer declared is forgotten.
    store.sync_timers(&[], 50_000).await.unwrap();
    assert!(store.timers().await.unwrap().is_empty());
}

async fn controller_role(store: &SqlStore) {
    let first = store.lock_controller("controller one").await.unwrap();
    match store.lock_controller("controller two").await {
        Err(e @ StoreError::ControllerRunning { .. }) => {
            assert!(e.to_string().contains("(controller one"), "{e}")
        }
        other => panic!("a second controller took the role: {:?}", other.err()),
    }
    first.release().await.unwrap();
    store.lock_controller("controller two").await.unwrap();
}

async fn app_data(store: &SqlStore) {
    use paddock_core::data::Scope;
    let cart = Scope::Bucket("cart");
    assert_eq!(store.data_get("shop", cart, "a").await.unwrap(), None);
    store.data_set("shop", cart, "a", b"1").await.unwrap();
    store.data_set("shop", cart, "a", b"two").await.unwrap();
    store.data_set("shop", cart, "b", &[0, 255]).await.unwrap();
    assert_eq!(
        store.data_get("shop", cart, "a").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        store.data_get("shop", cart, "b").await.unwrap().as_deref(),
        Some(&[0, 255][..])
    );
    // Apps, buckets and sessions are apart.
    assert_eq!(store.data_get("blog", cart, "a").await.unwrap(), None);
    assert_eq!(
        store
            .data_get("shop", Scope::Bucket(""), "a")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.data_keys("shop", cart, None, 10).await.unwrap(),
        ["a", "b"]
    );
    assert_eq!(
        store.data_keys("shop", cart, Some("a"), 10).await.unwrap(),
        ["b"]
    );
    store.data_delete("shop", cart, "a").await.unwrap();
    assert_eq!(
        store.data_keys("shop", cart, None, 10).await.unwrap(),
        ["b"]
    );

    // Increments are atomic: concurrent ones all count.
    let hits = Scope::Bucket("");
    let five = || async {
        let mut sums = Vec::new();
        for _ in 0..5 {
            sums.push(store.data_increment("shop", hits, "hits", 2).await.unwrap());
        }
        sums
    };
    let (a, b, c, d) = tokio::join!(five(), five(), five(), five());
    let mut sums: Vec<u64> = [a, b, c, d].concat();
    sums.sort();
    assert_eq!(
        sums,
        (1..=20).map(|n| n * 2).collect::<Vec<u64>>(),
        "each sum seen once"
    );
    assert_eq!(
        store
            .data_get("shop", hits, "hits")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"40"[..])
    );
    // What is no decimal number, or would pass i64::MAX, is refused and stays as it was.
    let max = i64::MAX.to_string();
    let refused: [(&str, &[u8]); 6] = [
        ("bytes", &[0, 255]),
        ("word", b"ten"),
        ("signed", b"-1"),
        ("float", b"1.5"),
        ("empty", b""),
        ("max", max.as_bytes()),
    ];
    for (key, value) in refused {
        store.data_set("shop", hits, key, value).await.unwrap();
        match store.data_increment("shop", hits, key, 1).await {
            Err(StoreError::DataValue(e)) => assert!(e.contains("cannot increment"), "{e}"),
            other => panic!("{key}: {other:?}"),
        }
        assert_eq!(
            store.data_get("shop", hits, key).await.unwrap().as_deref(),
            Some(value)
        );
    }
    assert!(matches!(
        store.data_increment("shop", hits, "new", u64::MAX).await,
        Err(StoreError::DataValue(_))
    ));
    store
        .data_set("shop", hits, "padded", b"007")
        .await
        .unwrap();
    assert_eq!(
        store
            .data_increment("shop", hits, "padded", 1)
            .await
            .unwrap(),
        8
    );
    store
        .data_set("shop", hits, "near", (i64::MAX - 1).to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(
        store.data_increment("shop", hits, "near", 1).await.unwrap(),
        i64::MAX as u64
    );

    // Sessions live while used, and go with their values once idle past their expiry.
    let (one, two) = (
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
    );
    use paddock_core::data::SessionFound;
    assert_eq!(
        store
            .session_touch("shop", one, 1_000, 500, true)
            .await
            .unwrap(),
        SessionFound::Missing
    );
    store.session_create("shop", one, 1_000, 500).await.unwrap();
    store.session_create("shop", two, 1_000, 500).await.unwrap();
    // The same id in another app is another session, living longer.
    store
        .session_create("blog", two, 1_000, 5_000)
        .await
        .unwrap();
    store
        .data_set("blog", Scope::Session(two), "user", b"eve")
        .await
        .unwrap();
    store
        .data_set("shop", Scope::Session(one), "user", b"ada")
        .await
        .unwrap();
    store
        .data_set("shop", Scope::Session(two), "user", b"bob")
        .await
        .unwrap();
    // Used again soon, a session is left as it is; once a tenth of its idle time has passed
    // since it was last extended, it is extended.
    assert_eq!(
        store
            .session_touch("shop", one, 1_040, 500, true)
            .await
            .unwrap(),
        SessionFound::Live
    );
    assert_eq!(
        store
            .session_touch("shop", one, 1_400, 500, false)
            .await
            .unwrap(),
        SessionFound::Live,
        "only looked at"
    );
    assert_eq!(
        store
            .session_touch("shop", one, 1_400, 500, true)
            .await
            .unwrap(),
        SessionFound::Extended
    );
    assert_eq!(
        store
            .session_touch("blog", one, 1_400, 500, true)
            .await
            .unwrap(),
        SessionFound::Missing,
        "another app's"
    );
    // Keys page by key, whatever is deleted between pages.
    for key in ["k1", "k2", "k3", "k4"] {
        store
            .data_set("shop", Scope::Session(one), key, b"x")
            .await
            .unwrap();
    }
    let page = store
        .data_keys("shop", Scope::Session(one), None, 2)
        .await
        .unwrap();
    assert_eq!(page, ["k1", "k2"]);
    for key in &page {
        store
            .data_delete("shop", Scope::Session(one), key)
            .await
            .unwrap();
    }
    let next = store
        .data_keys("shop", Scope::Session(one), Some("k2"), 2)
        .await
        .unwrap();
    assert_eq!(next, ["k3", "k4"]);
    assert_eq!(
        store.sweep_sessions(1_600).await.unwrap(),
        1,
        "two expired at 1 500"
    );
    assert_eq!(
        store
            .session_touch("shop", two, 1_600, 500, true)
            .await
            .unwrap(),
        SessionFound::Missing
    );
    assert_eq!(
        store
            .session_touch("blog", two, 1_600, 5_000, true)
            .await
            .unwrap(),
        SessionFound::Extended
    );
    assert_eq!(
        store
            .data_get("blog", Scope::Session(two), "user")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"eve"[..]),
        "blog's session of the same id stays"
    );
    // A write to a session swept meanwhile is refused, not kept without its session.
    assert!(
        store
            .data_set("shop", Scope::Session(two), "user", b"bob")
            .await
            .is_err()
    );
    assert_eq!(
        store
            .data_get("shop", Scope::Session(two), "user")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .data_get("shop", Scope::Session(one), "user")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"ada"[..])
    );
    assert_eq!(
        store
            .session_touch("shop", one, 1_900, 500, true)
            .await
            .unwrap(),
        SessionFound::Missing,
        "expired at 1 900"
    );
    assert_eq!(store.sweep_sessions(1_900).await.unwrap(), 1);
    assert_eq!(
        store
            .data_keys("shop", Scope::Session(one), None, 10)
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.data_keys("shop", cart, None, 10).await.unwrap(),
        ["b"],
        "buckets stay"
    );
    // A lowered idle time applies at the next use.
    store
        .session_create("shop", "00000000000000000000000000000001", 2_000, 9_000)
        .await
        .unwrap();
    assert_eq!(
        store
            .session_touch("shop", "00000000000000000000000000000001", 2_010, 500, true)
            .await
            .unwrap(),
        SessionFound::Extended
    );
    assert!(
        store
            .session_touch("shop", "00000000000000000000000000000001", 2_600, 500, true)
            .await
            .unwrap()
            == SessionFound::Missing,
        "it lives 500 from its last use, not 9 000"
    );
}

async fn config_overrides(store: &SqlStore) {
    let g0 = store.generation().await.unwrap();
    let g1 = store
        .set_config_override("shop", "currency", Some("EUR"))
        .await
        .unwrap()
        .unwrap();
    assert!(g1 > g0, "a set bumps the generation");
    let g2 = store
        .set_config_override("shop", "currency", Some("CHF"))
        .await
        .unwrap()
        .unwrap();
    assert!(g2 > g1);
    store
        .set_config_override("blog", "theme", Some("dark"))
        .await
        .unwrap();
    assert_eq!(
        store.config_overrides().await.unwrap(),
        [
            ("blog".into(), "theme".into(), "dark".into()),
            ("shop".into(), "currency".into(), "CHF".into())
        ]
    );
    let g3 = store
        .set_config_override("shop", "currency", None)
        .await
        .unwrap()
        .unwrap();
    assert!(g3 > g2, "an unset bumps the generation");
    // Unsetting what is not there changes nothing, not even the generation.
    assert_eq!(
        store
            .set_config_override("shop", "currency", None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.generation().await.unwrap(), g3);
    assert_eq!(store.config_overrides().await.unwrap().len(), 1);
}

async fn platform_builds(store: &SqlStore) {
    let build = |sha: &str, at| paddock_api::PlatformBuild {
        sha256: sha.repeat(64),
        version: "0.2.0".into(),
        size: 3_000_000_000,
        uploaded_ms: at,
    };
    assert_eq!(store.platform_builds().await.unwrap(), []);
    store.put_platform_build(&build("a", 10)).await.unwrap();
    store.put_platform_build(&build("b", 20)).await.unwrap();
    // Again: the first record stands.
    store.put_platform_build(&build("a", 30)).await.unwrap();
    assert_eq!(
        store.platform_build(&"a".repeat(64)).await.unwrap(),
        Some(build("a", 10)),
        "sizes past 2^31 survive"
    );
    assert_eq!(store.platform_build(&"c".repeat(64)).await.unwrap(), None);
    assert_eq!(
        store.platform_builds().await.unwrap(),
        [build("b", 20), build("a", 10)],
        "newest first"
    );

    store
        .register_server(&registration("fe1", "default"), 1)
        .await
        .unwrap();
    assert_eq!(store.server("fe1").await.unwrap().platform_target, None);
    let target = |sha: Option<String>| ServerChange {
        name: "fe1".into(),
        platform_target: Some(sha),
        ..ServerChange::default()
    };
    let g0 = store.generation().await.unwrap();
    let g1 = store
        .set_servers(&[target(Some("a".repeat(64)))])
        .await
        .unwrap();
    assert!(g1 > g0, "a target is desired state: the generation moves");
    let s = store.server("fe1").await.unwrap();
    assert_eq!(s.platform_target, Some("a".repeat(64)));
    assert_eq!(
        s.platform_target_generation,
        Some(g1),
        "it records who set it"
    );
    // Other changes leave the target alone.
    store
        .set_servers(&[ServerChange {
            name: "fe1".into(),
            lb: Some(LbState::Drain),
            ..ServerChange::default()
        }])
        .await
        .unwrap();
    let s = store.server("fe1").await.unwrap();
    assert_eq!(s.platform_target, Some("a".repeat(64)));
    assert_eq!(s.platform_target_generation, Some(g1));
    store.set_servers(&[target(None)]).await.unwrap();
    assert_eq!(store.server("fe1").await.unwrap().platform_target, None);

    // Balancers are told a build the same way, and learn it with the build's record.
    let report = |name: &str| BalancerReport {
        name: name.into(),
        listen: "127.0.0.1:8080".into(),
        admin: None,
        generation: 1,
        upstreams: vec![],
        platform: paddock_api::BuildState {
            build: Some("b".repeat(64)),
            ..Default::default()
        },
        apps: None,
        started_ms: 0,
    };
    for name in ["lb1", "lb2"] {
        store.balancer_report(&report(name), 5).await.unwrap();
    }
    assert_eq!(store.balancer_target("lb1").await.unwrap(), None);
    let before = store.generation().await.unwrap();
    match store
        .set_balancer_targets(&["lb1".into(), "lb3".into()], Some(&"a".repeat(64)))
        .await
    {
        Err(StoreError::UnknownBalancer(name)) => assert_eq!(name, "lb3"),
        other => panic!("a balancer that never reported is refused, got {other:?}"),
    }
    assert_eq!(
        store.balancer_target("lb1").await.unwrap(),
        None,
        "a refused change changes nothing"
    );
    assert_eq!(store.generation().await.unwrap(), before);
    let g = store
        .set_balancer_targets(&["lb1".into(), "lb2".into()], Some(&"a".repeat(64)))
        .await
        .unwrap();
    assert!(g > before);
    assert_eq!(
        store.balancer_target("lb2").await.unwrap(),
        Some((build("a", 10), g))
    );
    // A report keeps the target; the listing shows it.
    store.balancer_report(&report("lb1"), 6).await.unwrap();
    let listed = store.balancers(0).await.unwrap();
    assert_eq!(listed[0].report, report("lb1"));
    assert_eq!(
        (
            listed[0].platform_target.as_deref(),
            listed[0].platform_target_generation
        ),
        (Some("a".repeat(64).as_str()), Some(g))
    );
    store
        .set_balancer_targets(&["lb1".into()], None)
        .await
        .unwrap();
    assert_eq!(store.balancer_target("lb1").await.unwrap(), None);
    assert!(store.balancer_target("lb2").await.unwrap().is_some());
}

async fn cache_purges(store: &SqlStore) {
    assert_eq!(store.cache_purge_last().await.unwrap(), 0);
    assert_eq!(store.cache_purges_after(0, 10).await.unwrap(), []);
    let tags = ["product-1".to_string(), "list".to_string()];
    let ids = store
        .cache_purge_add("shop", &tags, "server fe1")
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    let all = store.cache_purge_add("blog", &[], "admin").await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(store.cache_purge_last().await.unwrap(), all[0]);

    let purges = store.cache_purges_after(0, 10).await.unwrap();
    let seen: Vec<_> = purges
        .iter()
        .map(|p| (p.app.as_str(), p.tag.as_deref(), p.source.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("shop", Some("product-1"), "server fe1"),
            ("shop", Some("list"), "server fe1"),
            ("blog", None, "admin"),
        ]
    );
    let after_first = store.cache_purges_after(ids[0], 1).await.unwrap();
    assert_eq!(after_first.len(), 1, "limited");
    assert_eq!(after_first[0].id, ids[1]);

    // Four writers at once: a reader that follows `id > last` meanwhile sees every id.
    let mut read = Vec::new();
    let mut last = store.cache_purge_last().await.unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let writer = |w: usize| async move {
        let mut ids = Vec::new();
        for n in 0..10 {
            let tag = format!("w{w}-{n}");
            ids.extend(
                store
                    .cache_purge_add("shop", &[tag], "admin")
                    .await
                    .unwrap(),
            );
        }
        ids
    };
    let writers = async {
        let ids = tokio::join!(writer(0), writer(1), writer(2), writer(3));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        [ids.0, ids.1, ids.2, ids.3].concat()
    };
    let reader = async {
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let more = store.cache_purges_after(last, 7).await.unwrap();
            if let Some(p) = more.last() {
                last = p.id;
            }
            read.extend(more.iter().map(|p| p.id));
            if finished && more.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    let (mut written, ()) = tokio::join!(writers, reader);
    written.sort();
    assert_eq!(read, written);

    // Rows are dated by the database's clock; the sweep forgets those older than it keeps.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        purges.iter().all(|p| (p.at_ms - now).abs() < 60_000),
        "{purges:?}"
    );
    assert_eq!(
        store
            .cache_purges_forget(paddock_store::PURGE_LOG_KEEP_MS)
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(store.cache_purges_forget(10).await.unwrap(), 43);
    assert_eq!(store.cache_purge_last().await.unwrap(), 0);
    let next = store.cache_purge_add("shop", &[], "admin").await.unwrap();
    assert!(next[0] > written[39], "ids are not reused");
}

on_both_backends!(
    cache_purges,
    platform_builds,
    config_overrides,
    app_data,
    controller_role,
    timer_claims,
    operations_journal,
    routing_state,
    servers_and_flags,
    versions_are_immutable,
    desired_state_per_zone,
    artifacts_and_audit
);

#[tokio::test]
async fn reopening_a_sqlite_store_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = SqlStore::open(&url).await.unwrap();
    store
        .register_server(&registration("fe1", "default"), 1)
        .await
        .unwrap();
    drop(store);
    let store = SqlStore::open(&url).await.unwrap();
    assert_eq!(store.servers().await.unwrap().len(), 1);
    assert!(matches!(
        SqlStore::open("mysql://x").await,
        Err(StoreError::BadUrl(_))
    ));
}
