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

use paddock_api::{LbState, Role, ServerInfo};
use paddock_core::ServerState;

use crate::api::ALIVE_WITHIN_MS;
use crate::{Controller, now_ms};

/// Why `server` cannot be put in rotation now, if it cannot: it must be alive and serve, loaded
/// and not failed, every version desired in its zone.
pub async fn not_ready(
    c: &Controller,
    server: &ServerInfo,
) -> paddock_store::Result<Option<String>> {
    let now = now_ms();
    let last_seen = server.heartbeat_ms.unwrap_or(server.registered_ms);
    if now - last_seen > ALIVE_WITHIN_MS {
        return Ok(Some(format!(
            "{} is down (no heartbeat for {} s)",
            server.name,
            (now - last_seen) / 1000
        )));
    }
    let loaded = server
        .observed
        .as_ref()
        .map(|o| o.apps.as_slice())
        .unwrap_or(&[]);
    let missing: Vec<String> = c
        .store
        .desired(&server.zone)
        .await?
        .into_iter()
        .filter_map(|d| {
            let serving = loaded
                .iter()
                .find(|l| l.name == d.app)
                .map(|l| l.version.as_str());
            (serving != Some(d.version.as_str())).then(|| {
                format!(
                    "{}@{} (it serves {})",
                    d.app,
                    d.version,
                    serving.unwrap_or("nothing")
                )
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} does not serve {} yet",
        server.name,
        missing.join(", ")
    )))
}

/// The automatic failover: looks every second for active front-ends in rotation that stopped
/// reporting `after` ago or more, and activates a ready passive server of the same zone instead.
pub async fn watch(c: Arc<Controller>, after: Duration) {
    let after_ms = after.as_millis() as i64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = check(&c, after_ms).await {
            tracing::warn!("failover check: {e}");
        }
    }
}

async fn check(c: &Controller, after_ms: i64) -> paddock_store::Result<()> {
    let servers = c.store.servers().await?;
    let now = now_ms();
    let dead: Vec<&ServerInfo> = servers
        .iter()
        .filter(|s| {
            s.role == Role::Active
                && s.lb == LbState::Ready
                && now - s.heartbeat_ms.unwrap_or(s.registered_ms) >= after_ms
                && s.observed.as_ref().map(|o| o.state) != Some(ServerState::Stopping)
        })
        .collect();
    let mut taken = Vec::new();
    for failed in dead {
        // Serialized with manual changes and operations, like every routing change.
        let _gate = c.zone_gate.lock().await;
        if c.store.zone_lock(&failed.zone).await?.is_some() {
            continue;
        }
        let mut standby = None;
        for s in servers.iter().filter(|s| {
            s.zone == failed.zone
                && s.role == Role::Passive
                && s.lb == LbState::Ready
                && !taken.contains(&s.name)
        }) {
            if not_ready(c, s).await?.is_none() {
                standby = Some(s);
                break;
            }
        }
        let Some(standby) = standby else {
            continue;
        };
        let silent_s = (now - failed.heartbeat_ms.unwrap_or(failed.registered_ms)) / 1000;
        let generation = c
            .store
            .set_roles(&[
                (standby.name.as_str(), Role::Active),
                (failed.name.as_str(), Role::Passive),
            ])
            .await?;
        let what = format!(
            "{} takes over from {} in zone {} ({} sent no heartbeat for {silent_s} s); {} is passive now",
            standby.name, failed.name, failed.zone, failed.name, failed.name
        );
        c.store.audit("controller", "failover", &what, now).await?;
        tracing::warn!("failover: {what}");
        c.announce(generation);
        taken.push(standby.name.clone());
    }
    Ok(())
}
