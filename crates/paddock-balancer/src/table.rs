//! The routing table in the form requests use: routes by prefix, zones with their members and
//! policy, and the selection of a member for one request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use paddock_api::{LbState, Policy, RoutingTable};
use paddock_core::route_matches;

use crate::upstream::{PoolConfig, Upstream};

pub struct Table {
    pub generation: i64,
    /// Longest prefix first.
    routes: Vec<Route>,
    pub zones: Vec<Zone>,
}

pub struct Route {
    pub prefix: String,
    pub app: Arc<String>,
    pub zone: usize,
}

pub struct Zone {
    pub name: String,
    pub policy: Policy,
    pub members: Vec<Member>,
    /// Member indexes in smooth weighted round-robin order (ratio policy).
    ratio: Vec<usize>,
    next: AtomicUsize,
}

pub struct Member {
    pub upstream: Arc<Upstream>,
    pub state: LbState,
    pub weight: u32,
}

impl Table {
    pub fn empty() -> Table {
        Table {
            generation: 0,
            routes: Vec::new(),
            zones: Vec::new(),
        }
    }

    /// Builds a table, reusing the upstreams of `previous` that keep their name and address.
    pub fn build(wire: &RoutingTable, previous: &Table, pool: &PoolConfig) -> Table {
        let mut known: HashMap<(&str, &str), &Arc<Upstream>> = HashMap::new();
        for zone in &previous.zones {
            for m in &zone.members {
                known.insert((&m.upstream.name, &m.upstream.address), &m.upstream);
            }
        }
        let zones: Vec<Zone> = wire
            .zones
            .iter()
            .map(|z| {
                let members: Vec<Member> = z
                    .upstreams
                    .iter()
                    .map(|u| {
                        let upstream = match known.get(&(u.name.as_str(), u.address.as_str())) {
                            Some(existing) => Arc::clone(existing),
                            None => Arc::new(Upstream::new(
                                u.name.clone(),
                                u.address.clone(),
                                pool.clone(),
                            )),
                        };
                        let maint = u.state == LbState::Maint;
                        if upstream.maint.swap(maint, Ordering::AcqRel) && !maint {
                            // Out of maintenance: what was known of it before is stale.
                            upstream.forget_health();
                        }
                        Member {
                            upstream,
                            state: u.state,
                            weight: u.weight.clamp(1, 100),
                        }
                    })
                    .collect();
                Zone {
                    name: z.zone.clone(),
                    policy: z.policy,
                    ratio: smooth_weighted_order(&members),
                    members,
                    next: AtomicUsize::new(0),
                }
            })
            .collect();
        let mut routes: Vec<Route> = wire
            .routes
            .iter()
            .filter_map(|r| {
                let zone = zones.iter().position(|z| z.name == r.zone)?;
                Some(Route {
                    prefix: r.prefix.clone(),
                    app: Arc::new(r.app.clone()),
                    zone,
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Table {
            generation: wire.generation,
            routes,
            zones,
        }
    }

    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| route_matches(&r.prefix, path))
    }

    /// Every app the table routes, once, by name.
    pub fn apps(&self) -> Vec<&Arc<String>> {
        let mut apps: Vec<&Arc<String>> = self.routes.iter().map(|r| &r.app).collect();
        apps.sort();
        apps.dedup();
        apps
    }

    /// Every upstream of the table, once.
    pub fn upstreams(&self) -> impl Iterator<Item = (&Zone, &Member)> {
        self.zones
            .iter()
            .flat_map(|z| z.members.iter().map(move |m| (z, m)))
    }
}

impl Zone {
    /// Picks a member for a request to `app`, skipping the upstreams in `tried` (by
    /// [`Upstream::id`]): ready, healthy and serving the app, chosen by the zone's policy.
    pub fn pick(&self, app: &str, tried: &[usize]) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let takes_traffic = |m: &Member| m.state == LbState::Ready && m.upstream.is_up();
        // Front-ends whose health report lists the app are preferred; while none does yet (an
        // app just deployed, between two checks), every healthy one is tried.
        let known = self
            .members
            .iter()
            .any(|m| takes_traffic(m) && m.upstream.serves(app));
        let routable = |i: usize| {
            let m = &self.members[i];
            takes_traffic(m)
                && !tried.contains(&m.upstream.id())
                && (!known || m.upstream.serves(app))
        };
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        match self.policy {
            Policy::RoundRobin => (0..n).map(|k| (turn + k) % n).find(|&i| routable(i)),
            Policy::LeastConnections => (0..n)
                .map(|k| (turn + k) % n)
                .filter(|&i| routable(i))
                .min_by_key(|&i| self.members[i].upstream.in_flight()),
            Policy::Ratio => {
                let len = self.ratio.len();
                (0..len)
                    .map(|k| self.ratio[(turn + k) % len])
                    .find(|&i| routable(i))
            }
        }
    }

    /// Why no member can take a request for `app`: how many are ready, healthy, serving it.
    pub fn describe_unroutable(&self, app: &str) -> String {
        let ready = self
            .members
            .iter()
            .filter(|m| m.state == LbState::Ready)
            .count();
        let healthy = self
            .members
            .iter()
            .filter(|m| m.state == LbState::Ready && m.upstream.is_up())
            .count();
        let serving = self
            .members
            .iter()
            .filter(|m| m.state == LbState::Ready && m.upstream.is_up() && m.upstream.serves(app))
            .count();
        format!(
            "zone {} has {} front-end(s): {ready} ready, {healthy} of them healthy, {serving} of those serving {app}",
            self.name,
            self.members.len()
        )
    }
}

/// The order of nginx's smooth weighted round-robin over one full cycle: each member appears
/// `weight` times, spread out rather than in runs.
fn smooth_weighted_order(members: &[Member]) -> Vec<usize> {
    let total: i64 = members.iter().map(|m| i64::from(m.weight)).sum();
    let mut current = vec![0i64; members.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, m) in current.iter_mut().zip(members) {
            *c += i64::from(m.weight);
        }
        let Some(best) = (0..members.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
        else {
            break;
        };
        current[best] -= total;
        order.push(best);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_api::{RouteEntry, Upstream as WireUpstream, ZoneRouting};
    use std::time::Duration;

    fn pool() -> PoolConfig {
        PoolConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            max_idle: 8,
            workers: 1,
        }
    }

    fn wire(policy: Policy, weights: &[u32]) -> RoutingTable {
        RoutingTable {
            generation: 3,
            zones: vec![ZoneRouting {
                zone: "z".into(),
                policy,
                upstreams: weights
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| WireUpstream {
                        name: format!("fe{i}"),
                        address: format!("127.0.0.1:{}", 9000 + i),
                        state: LbState::Ready,
                        weight: w,
                    })
                    .collect(),
            }],
            routes: vec![
                RouteEntry {
                    prefix: "/".into(),
                    app: "root".into(),
                    zone: "z".into(),
                },
                RouteEntry {
                    prefix: "/hello".into(),
                    app: "hello".into(),
                    zone: "z".into(),
                },
            ],
        }
    }

    fn healthy(table: &Table) {
        for (_, m) in table.upstreams() {
            m.upstream.check_passed(vec!["hello".into()], 2);
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = Table::build(&wire(Policy::RoundRobin, &[1]), &Table::empty(), &pool());
        assert_eq!(&*t.route("/hello/x").unwrap().app, "hello");
        assert_eq!(&*t.route("/helloworld").unwrap().app, "root");
    }

    #[test]
    fn ratio_follows_weights_and_spreads() {
        let t = Table::build(&wire(Policy::Ratio, &[3, 1]), &Table::empty(), &pool());
        healthy(&t);
        let picks: Vec<usize> = (0..8)
            .map(|_| t.zones[0].pick("hello", &[]).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks[..4], [0, 0, 1, 0], "smooth order, not runs");
    }

    #[test]
    fn only_ready_healthy_serving_members_are_picked() {
        let t = Table::build(
            &wire(Policy::RoundRobin, &[1, 1, 1]),
            &Table::empty(),
            &pool(),
        );
        assert_eq!(t.zones[0].pick("hello", &[]), None, "no health check yet");
        healthy(&t);
        assert!(
            t.zones[0].pick("other", &[]).is_some(),
            "an app no front-end reports yet goes to any healthy one"
        );
        t.zones[0].members[0]
            .upstream
            .check_passed(vec!["other".into()], 2);
        for _ in 0..3 {
            assert_eq!(
                t.zones[0].pick("other", &[]),
                Some(0),
                "the one reporting it"
            );
        }
        t.zones[0].members[0]
            .upstream
            .check_passed(vec!["hello".into()], 2);
        t.zones[0].members[1].upstream.failed_passively("test");
        let first = t.zones[0].members[0].upstream.id();
        for _ in 0..6 {
            let i = t.zones[0].pick("hello", &[first]).unwrap();
            assert_eq!(i, 2, "0 was tried, 1 is down");
        }
        // A new table keeps health for the same name and address.
        let again = Table::build(&wire(Policy::RoundRobin, &[1, 1, 1]), &t, &pool());
        assert!(again.zones[0].members[0].upstream.is_up());
        assert!(!again.zones[0].members[1].upstream.is_up());
    }
}
