//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! One [`Metrics`] lives for the whole process (it survives reloads), so counters do not
//! reset when the config changes. The pipeline records a request once it is answered; the
//! upstream layer records member health and connection reuse.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatusLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub group: String,
    pub member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// All metrics of the proxy.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatusLabels, Counter>,
    pub latency: LatencyFamily,
    pub member_healthy: Family<MemberLabels, Gauge>,
    pub upstream_requests: Family<MemberLabels, Counter>,
    pub retries: Family<RouteLabels, Counter>,
    pub connections_opened: Counter,
    pub pool_reused: Counter,
    /// Requests sent again on a new connection after the member closed the pooled one they
    /// were written on (see `upstream::h1`).
    pub pool_replayed: Counter,
    pub reloads: Family<ResultLabels, Counter>,
    /// The series of requests that matched no route (`route="-"`).
    pub unmatched: RouteMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("l7");
        let requests = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        let latency = LatencyFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by route",
            latency.clone(),
        );
        let member_healthy = Family::<MemberLabels, Gauge>::default();
        registry.register(
            "upstream_member_healthy",
            "1 when an upstream member takes traffic, 0 when down or ejected",
            member_healthy.clone(),
        );
        let upstream_requests = Family::<MemberLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests sent to each upstream member",
            upstream_requests.clone(),
        );
        let retries = Family::<RouteLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests retried on another member, by route",
            retries.clone(),
        );
        let connections_opened = Counter::default();
        registry.register(
            "upstream_connections_opened",
            "TCP connections opened to upstream members",
            connections_opened.clone(),
        );
        let pool_reused = Counter::default();
        registry.register(
            "upstream_pool_reused",
            "Upstream requests sent on a pooled keep-alive connection",
            pool_reused.clone(),
        );
        let pool_replayed = Counter::default();
        registry.register(
            "upstream_pool_replayed",
            "Upstream requests sent again on a new connection after the member closed the \
             pooled one they were written on (idempotent, without a body)",
            pool_replayed.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by result (ok / error)",
            reloads.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            member_healthy,
            upstream_requests,
            retries,
            connections_opened,
            pool_reused,
            pool_replayed,
            reloads,
            unmatched: RouteMetrics::new("-".to_string()),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn record_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }
}

/// One route's request series, found once and kept with the route: a request then costs a
/// short search among the statuses the route has answered, instead of two label-set hash
/// lookups and label strings built per request.
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    latency: OnceLock<Histogram>,
    by_status: Mutex<Vec<(u16, Counter)>>,
}

impl RouteMetrics {
    pub fn new(route: String) -> Self {
        Self {
            route,
            latency: OnceLock::new(),
            by_status: Mutex::new(Vec::new()),
        }
    }

    /// Counts a request answered with `status` after `elapsed` (to the response head).
    pub fn record(&self, metrics: &Metrics, status: u16, elapsed: Duration) {
        {
            let mut by_status = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
            match by_status.iter().find(|(s, _)| *s == status) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let counter = metrics
                        .requests
                        .get_or_create(&RouteStatusLabels {
                            route: self.route.clone(),
                            status,
                        })
                        .clone();
                    counter.inc();
                    by_status.push((status, counter));
                }
            }
        }
        self.latency
            .get_or_init(|| {
                metrics
                    .latency
                    .get_or_create(&RouteLabels {
                        route: self.route.clone(),
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
    }
}
