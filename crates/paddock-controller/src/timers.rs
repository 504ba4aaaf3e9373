//! Timers: the timers of the desired app versions, kept in the store, claimed by the front-ends'
//! scheduler services through the control channel. The store does the claiming (lease, fencing
//! token, catch-up); this module keeps the timers table in line with the desired versions.

use paddock_store::{StoreError, TimerDef};

use crate::{Controller, now_ms};

/// How long a claimed run holds its timer without a renewal; the scheduler services renew every
/// third of it. A run whose server died is claimed again this long after its last renewal.
pub const LEASE_MS: i64 = 10_000;
/// Most ticks one claim hands out.
pub const CLAIM_LIMIT: i64 = 32;

/// Makes the timers table match the timers declared by every desired version. Called after
/// each change of desired versions and at start.
pub async fn sync(c: &Controller) -> Result<(), StoreError> {
    // One at a time: a sync that read older desired versions must not commit after a newer one.
    let _one = c.timer_sync.lock().await;
    let mut defs = Vec::new();
    let mut zones: Vec<String> = c.store.apps().await?.into_iter().map(|a| a.zone).collect();
    zones.sort();
    zones.dedup();
    for zone in zones {
        for version in c.store.desired(&zone).await? {
            for timer in &version.manifest.timers {
                defs.push(TimerDef {
                    app: version.app.clone(),
                    timer: timer.name.clone(),
                    zone: version.zone.clone(),
                    version: version.version.clone(),
                    schedule: timer.schedule.clone(),
                    path: timer.path.clone(),
                });
            }
        }
    }
    c.store.sync_timers(&defs, now_ms()).await
}
