//! The routing table the balancers follow, and the facts an operation waits on: "every live
//! balancer routes by generation G" and "this front-end is drained".

use std::collections::BTreeMap;

use paddock_api::{
    BalancerInfo, LbState, Policy, Role, RoutingTable, ServerInfo, Upstream, ZoneRouting,
};
use paddock_store::Store;
use serde::{Deserialize, Serialize};

/// A balancer counts as live when it reported within this long (it reports every second).
pub const BALANCER_ALIVE_WITHIN_MS: i64 = 3_000;

/// The table at the store's current generation. Passive servers take no traffic: they are in it
/// as `maint`, so that the balancers keep reporting the requests still in flight to one just
/// made passive (its drain is a fact like any other).
pub async fn table(store: &dyn Store) -> paddock_store::Result<RoutingTable> {
    Ok(read(store).await?.0)
}

/// The table, and the servers it was built from.
async fn read(store: &dyn Store) -> paddock_store::Result<(RoutingTable, Vec<ServerInfo>)> {
    // The generation is read first: a change committed after this read bumps it again, so a
    // balancer never records a generation whose changes it has not seen.
    let generation = store.generation().await?;
    let servers = store.servers().await?;
    let routes = store.routes().await?;
    let policies: BTreeMap<String, Policy> = store.zone_policies().await?.into_iter().collect();
    let mut zones: BTreeMap<String, ZoneRouting> = BTreeMap::new();
    for route in &routes {
        zone(&mut zones, &policies, &route.zone);
    }
    for server in &servers {
        zone(&mut zones, &policies, &server.zone)
            .upstreams
            .push(Upstream {
                name: server.name.clone(),
                address: server.address.clone(),
                state: match server.role {
                    Role::Active => server.lb,
                    Role::Passive => LbState::Maint,
                },
                weight: server.weight,
            });
    }
    let table = RoutingTable {
        generation,
        zones: zones.into_values().collect(),
        routes,
    };
    Ok((table, servers))
}

/// The zone `name` of the table being built, added with its policy the first time.
fn zone<'a>(
    zones: &'a mut BTreeMap<String, ZoneRouting>,
    policies: &BTreeMap<String, Policy>,
    name: &str,
) -> &'a mut ZoneRouting {
    zones
        .entry(name.to_string())
        .or_insert_with(|| ZoneRouting {
            zone: name.to_string(),
            policy: policies.get(name).copied().unwrap_or_default(),
            upstreams: Vec::new(),
        })
}

/// `GET /v1/routing`: the table, who routes by what, and which front-ends are drained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingStatus {
    pub table: RoutingTable,
    pub balancers: Vec<BalancerInfo>,
    /// The generation `applied` and `pending` are about: the one asked for, or the table's.
    pub generation: i64,
    /// Whether every live balancer routes by `generation` or newer.
    pub applied: bool,
    /// Live balancers still routing by an older table.
    pub pending: Vec<String>,
    pub servers: Vec<UpstreamStatus>,
}

/// One front-end as the routing sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub zone: String,
    /// A passive server is in the table as `maint`, whatever its `state`.
    #[serde(default)]
    pub role: Role,
    pub state: LbState,
    pub weight: u32,
    /// Requests in flight on the front-end, from its last heartbeat.
    pub in_flight: Option<u64>,
    /// Requests the live balancers have sent it and not yet finished relaying.
    pub balancer_in_flight: u64,
    /// Live balancers whose health checks pass for it.
    pub up_on: Vec<String>,
    /// `drain`, `maint` or passive, every live balancer routes by a table that says so, none of them
    /// has a request in flight to it, and the front-end reported zero in flight after the last
    /// of those acknowledgements (or it is not alive: a dead process serves nothing).
    pub drained: bool,
}

/// Computes the routing status from the store: whether every live balancer applied `generation`
/// (default: the current one), and which front-ends are drained. A front-end is alive when its
/// last heartbeat is at most `frontend_alive_within_ms` old.
pub async fn status(
    store: &dyn Store,
    generation: Option<i64>,
    now_ms: i64,
    frontend_alive_within_ms: i64,
) -> paddock_store::Result<RoutingStatus> {
    let (table, servers) = read(store).await?;
    let generation = generation.unwrap_or(table.generation);
    let balancers = store.balancers(now_ms - BALANCER_ALIVE_WITHIN_MS).await?;
    let live: Vec<&BalancerInfo> = balancers.iter().filter(|b| b.alive).collect();
    let pending: Vec<String> = live
        .iter()
        .filter(|b| b.report.generation < generation)
        .map(|b| b.report.name.clone())
        .collect();
    let applied = pending.is_empty();
    // Drained is judged against the current table: the one that says drain.
    let current_applied = live.iter().all(|b| b.report.generation >= table.generation);
    let last_ack_ms = live.iter().map(|b| b.applied_ms).max().unwrap_or(0);
    let servers = servers
        .into_iter()
        .map(|server| {
            upstream_status(
                server,
                &live,
                current_applied,
                last_ack_ms,
                now_ms,
                frontend_alive_within_ms,
            )
        })
        .collect();
    Ok(RoutingStatus {
        table,
        balancers,
        generation,
        applied,
        pending,
        servers,
    })
}

fn upstream_status(
    server: ServerInfo,
    live: &[&BalancerInfo],
    applied: bool,
    last_ack_ms: i64,
    now_ms: i64,
    frontend_alive_within_ms: i64,
) -> UpstreamStatus {
    let mut balancer_in_flight = 0;
    let mut up_on = Vec::new();
    for b in live {
        if let Some(u) = b.report.upstreams.iter().find(|u| u.name == server.name) {
            balancer_in_flight = u64::saturating_add(balancer_in_flight, u.in_flight);
            if u.up {
                up_on.push(b.report.name.clone());
            }
        }
    }
    let last_seen = server.heartbeat_ms.unwrap_or(server.registered_ms);
    let alive = now_ms - last_seen <= frontend_alive_within_ms;
    let in_flight = server.observed.as_ref().map(|o| o.in_flight);
    let frontend_idle =
        !alive || (server.heartbeat_ms.is_some_and(|t| t > last_ack_ms) && in_flight == Some(0));
    UpstreamStatus {
        drained: (server.lb != LbState::Ready || server.role != Role::Active)
            && applied
            && balancer_in_flight == 0
            && frontend_idle,
        name: server.name,
        zone: server.zone,
        role: server.role,
        state: server.lb,
        weight: server.weight,
        in_flight,
        balancer_in_flight,
        up_on,
    }
}
