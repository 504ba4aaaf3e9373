//! `/metrics` in Prometheus text format: requests by app, version, status and server; latency by
//! app; each upstream's health, routing state and requests in flight; the routing generation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::table::Table;
use paddock_api::AppTrafficCounts;

/// Label values shared by many requests are reference-counted, so that counting a request
/// allocates nothing for them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub app: Arc<String>,
    pub version: Arc<String>,
    pub status: u16,
    /// The front-end that answered, or empty when the balancer answered itself.
    pub server: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    server: String,
    zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoopLabels {
    event_loop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    server: String,
    zone: String,
    state: String,
}

/// An app's latency histogram, with its count of answers readable for the controller's reports
/// (the histogram keeps its own, which `prometheus-client` does not give out).
#[derive(Debug)]
struct AppLatency {
    histogram: Histogram,
    answered: AtomicU64,
}

impl AppLatency {
    fn new() -> AppLatency {
        AppLatency {
            // 0.5 ms to ~16 s.
            histogram: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            answered: AtomicU64::new(0),
        }
    }
}

impl TypedMetric for AppLatency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AppLatency {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.histogram.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<AppLabels, AppLatency>,
    failed: Family<AppLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    upstream_up: Family<UpstreamLabels, Gauge>,
    upstream_state: Family<StateLabels, Gauge>,
    upstream_in_flight: Family<UpstreamLabels, Gauge>,
    client_connections: Family<LoopLabels, Gauge>,
    generation: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("paddock_balancer");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<AppLabels, AppLatency>::new_with_constructor(AppLatency::new as fn() -> _);
        let failed = Family::<AppLabels, Counter>::default();
        let retries = Family::<UpstreamLabels, Counter>::default();
        let upstream_up = Family::<UpstreamLabels, Gauge>::default();
        let upstream_state = Family::<StateLabels, Gauge>::default();
        let upstream_in_flight = Family::<UpstreamLabels, Gauge>::default();
        let client_connections = Family::<LoopLabels, Gauge>::default();
        let generation = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by app, version, status and front-end",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response, by app",
            duration.clone(),
        );
        registry.register(
            "failed_requests",
            "Requests answered with a 5xx status (the balancer's own included), by app",
            failed.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another front-end after this one failed before answering",
            retries.clone(),
        );
        registry.register(
            "upstream_up",
            "1 when the front-end's health checks pass",
            upstream_up.clone(),
        );
        registry.register(
            "upstream_state",
            "1 for the front-end's routing state (ready, drain, maint)",
            upstream_state.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open, by event loop (thread)",
            client_connections.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests sent to the front-end and not yet finished",
            upstream_in_flight.clone(),
        );
        registry.register(
            "routing_generation",
            "The generation of the routing table in use",
            generation.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            duration,
            failed,
            retries,
            upstream_up,
            upstream_state,
            upstream_in_flight,
            client_connections,
            generation,
        }
    }

    pub fn request(&self, labels: RequestLabels, seconds: f64) {
        let app = AppLabels {
            app: labels.app.clone(),
        };
        {
            let latency = self.duration.get_or_create(&app);
            latency.histogram.observe(seconds);
            latency.answered.fetch_add(1, Ordering::Relaxed);
        }
        if labels.status >= 500 {
            self.failed.get_or_create(&app).inc();
        }
        self.requests.get_or_create(&labels).inc();
    }

    /// Shows the count of access log lines lost (`--access-log`).
    pub fn count_access_log(&self, lost: Counter) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(
                "access_log_lost_lines",
                "Access log lines dropped (the writer fell behind) or not written (a write failed)",
                lost,
            );
    }

    /// The requests answered for `app` since the start, and how many with a 5xx status.
    pub fn app_traffic(&self, app: &Arc<String>) -> AppTrafficCounts {
        let labels = AppLabels { app: app.clone() };
        AppTrafficCounts {
            answered: self
                .duration
                .get(&labels)
                .map_or(0, |l| l.answered.load(Ordering::Relaxed)),
            failed: self.failed.get(&labels).map_or(0, |c| c.get()),
        }
    }

    pub fn retry(&self, server: &str, zone: &str) {
        self.retries
            .get_or_create(&UpstreamLabels {
                server: server.into(),
                zone: zone.into(),
            })
            .inc();
    }

    /// The text exposition, with the upstream gauges read from `table` now and the client
    /// connections open on each event loop.
    pub fn render(&self, table: &Table, connections: &[usize]) -> String {
        for (index, open) in connections.iter().enumerate() {
            self.client_connections
                .get_or_create(&LoopLabels {
                    event_loop: index.to_string(),
                })
                .set(*open as i64);
        }
        self.upstream_up.clear();
        self.upstream_state.clear();
        self.upstream_in_flight.clear();
        for (zone, m) in table.upstreams() {
            let labels = UpstreamLabels {
                server: m.upstream.name.clone(),
                zone: zone.name.clone(),
            };
            self.upstream_up
                .get_or_create(&labels)
                .set(i64::from(m.upstream.is_up()));
            self.upstream_in_flight
                .get_or_create(&labels)
                .set(m.upstream.in_flight() as i64);
            self.upstream_state
                .get_or_create(&StateLabels {
                    server: labels.server,
                    zone: labels.zone,
                    state: m.state.as_str().into(),
                })
                .set(1);
        }
        self.generation.set(table.generation);
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock()
            && let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry)
        {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
