//! Active and passive front-ends (the failover procedure of the operations guides).
//!
//! A passive server stands by: its deployment service keeps it on the desired versions, but the
//! balancers do not route to it and it claims no timer. Activating one puts it in rotation with
//! its scheduler; it is refused unless the server is alive and serves every version desired in
//! its zone, so that users never reach a server that would answer with another version or 404.
//!
//! With `--failover-after`, the controller does it itself: when an active front-end that was in
//! rotation stops reporting (a crash: a server stopped on purpose says `stopping` first) for that
//! long, a ready passive server of its zone is activated and the dead one becomes passive, in one
//! generation. Zones an operation holds are left to the operation.

use std::sync::Arc;
use std::time::Duration;

use paddock_api::{LbState, Role, ServerInfo, VersionInfo};
use paddock_core::ServerState;

use crate::api::{ALIVE_WITHIN_MS, silent_ms};
use crate::{Controller, now_ms};

/// Why `server` cannot be put in rotation now, if it cannot: it must be alive, report `serving`,
/// and serve every version of `desired` (its zone's).
pub fn not_ready(server: &ServerInfo, desired: &[VersionInfo]) -> Option<String> {
    let silent = silent_ms(server, now_ms());
    if silent > ALIVE_WITHIN_MS {
        return Some(format!(
            "{} is down (no heartbeat for {} s)",
            server.name,
            silent / 1000
        ));
    }
    let state = server.observed.as_ref().map(|o| o.state);
    if state != Some(ServerState::Serving) {
        return Some(format!(
            "{} is not serving (it reports {})",
            server.name,
            match state {
                Some(ServerState::Draining) => "draining",
                Some(ServerState::Stopping) => "stopping",
                _ => "nothing yet",
            }
        ));
    }
    let missing: Vec<String> = crate::api::not_served(server, desired)
        .into_iter()
        .map(|(d, serving)| {
            format!(
                "{}@{} (it serves {})",
                d.app,
                d.version,
                serving.unwrap_or("nothing")
            )
        })
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "{} does not serve {} yet",
        server.name,
        missing.join(", ")
    ))
}

/// The automatic failover: looks every second for active front-ends in rotation that stopped
/// reporting `after` ago or more, and activates a ready passive server of the same zone instead.
pub async fn watch(c: Arc<Controller>, after: Duration) {
    let after_ms = after.as_millis() as i64;
    // Silence is counted from this controller's start at the earliest: while it was down, no
    // heartbeat could arrive, and the front-ends need a moment to find it again.
    let started_ms = now_ms();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = check(&c, after_ms, started_ms).await {
            tracing::warn!("failover check: {e}");
        }
    }
}

/// How long `server` has been silent, as far as a controller started at `started_ms` knows.
fn silent_since_start(server: &ServerInfo, now: i64, started_ms: i64) -> i64 {
    silent_ms(server, now).min(now - started_ms)
}

/// Whether `server` is an active front-end in rotation that died: silent for `after_ms` without
/// having said it stops.
fn failed(server: &ServerInfo, now: i64, started_ms: i64, after_ms: i64) -> bool {
    server.role == Role::Active
        && server.lb == LbState::Ready
        && silent_since_start(server, now, started_ms) >= after_ms
        && server.observed.as_ref().map(|o| o.state) != Some(ServerState::Stopping)
}

async fn check(c: &Controller, after_ms: i64, started_ms: i64) -> paddock_store::Result<()> {
    // Under the zone gate from the read to the write: no manual change or operation lands in
    // between.
    let _gate = c.zone_gate.lock().await;
    let servers = c.store.servers().await?;
    let now = now_ms();
    let mut taken = Vec::new();
    for dead in servers
        .iter()
        .filter(|s| failed(s, now, started_ms, after_ms))
    {
        if c.store.zone_lock(&dead.zone).await?.is_some() {
            continue;
        }
        let desired = c.store.desired(&dead.zone).await?;
        let standby = servers.iter().find(|s| {
            s.zone == dead.zone
                && s.role == Role::Passive
                && s.lb == LbState::Ready
                && !taken.contains(&s.name)
                && not_ready(s, &desired).is_none()
        });
        let Some(standby) = standby else {
            continue;
        };
        let generation = c
            .store
            .set_roles(&[
                (standby.name.as_str(), Role::Active),
                (dead.name.as_str(), Role::Passive),
            ])
            .await?;
        let what = format!(
            "{} takes over from {} in zone {} ({} sent no heartbeat for {} s); {} is passive now",
            standby.name,
            dead.name,
            dead.zone,
            dead.name,
            silent_since_start(dead, now, started_ms) / 1000,
            dead.name
        );
        c.store.audit("controller", "failover", &what, now).await?;
        tracing::warn!("failover: {what}");
        c.announce(generation);
        taken.push(standby.name.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(heartbeat_ms: Option<i64>, state: ServerState) -> ServerInfo {
        ServerInfo {
            name: "fe1".into(),
            zone: "default".into(),
            address: "127.0.0.1:1".into(),
            platform_version: "0".into(),
            engine: "0".into(),
            role: Role::Active,
            deployment: true,
            scheduler: true,
            registered_ms: 1_000,
            heartbeat_ms,
            observed: Some(paddock_api::HealthReport {
                server: "fe1".into(),
                state,
                apps: Vec::new(),
                in_flight: 0,
                failed: Vec::new(),
                build: None,
                upgrade_error: None,
                installing: None,
                incarnation: None,
                cache: None,
            }),
            lb: LbState::Ready,
            weight: 1,
            platform_target: None,
            platform_target_generation: None,
        }
    }

    #[test]
    fn silence_is_counted_from_the_controllers_start_at_the_earliest() {
        let s = server(Some(10_000), ServerState::Serving);
        // Silent for 50 s, but the controller started 5 s ago: not failed yet.
        assert!(!failed(&s, 60_000, 55_000, 30_000));
        assert!(failed(&s, 60_000, 20_000, 30_000));
        assert!(!failed(&s, 60_000, 20_000, 60_000));
    }

    #[test]
    fn a_server_that_said_it_stops_or_is_out_of_rotation_or_passive_has_not_failed() {
        assert!(!failed(
            &server(Some(0), ServerState::Stopping),
            60_000,
            0,
            30_000
        ));
        let mut s = server(Some(0), ServerState::Serving);
        assert!(failed(&s, 60_000, 0, 30_000));
        s.lb = LbState::Drain;
        assert!(!failed(&s, 60_000, 0, 30_000));
        s.lb = LbState::Ready;
        s.role = Role::Passive;
        assert!(!failed(&s, 60_000, 0, 30_000));
    }
}
