//! Upstream groups: their members, health, balancing and the pooled client that reaches them.
//!
//! A group is built from its `[[upstreams]]` entry once per config generation
//! ([`UpstreamGroup::build`]). The pipeline asks it for a member ([`UpstreamGroup::pick`]),
//! forwards the request with the group's client, and reports how it went
//! ([`Member::record_outcome`]) so passive health can eject a failing member. Active health
//! checks run in background tasks ([`health`]) that end when the generation is dropped.

pub mod balance;
pub mod client;
mod h1;
pub mod health;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::config::{
    HashOn, PassiveHealthConfig, RetryConfig, UpstreamGroupConfig, UpstreamProtocol,
};
use crate::metrics::{MemberLabels, Metrics};
use balance::{hash_bytes, Balancer};
use client::{ClientCache, ClientSettings, GroupClient};

/// True for the methods RFC 9110 (9.2.2) calls idempotent: a request with one of them (and
/// without a body) may be sent again, to another member or over a new connection.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// Milliseconds since the first call: a cheap monotonic clock for atomics.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One upstream server and its health.
pub struct Member {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once instead of per request.
    pub authority: http::uri::Authority,
    pub weight: u32,
    labels: MemberLabels,
    /// Its `l7_upstream_requests` series, found on the first request.
    requests: OnceLock<prometheus_client::metrics::counter::Counter>,
    /// Set by active health checks (always true without them).
    active_up: AtomicBool,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// `now_ms()` until which passive health keeps the member out; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("addr", &self.addr)
            .field("available", &self.is_available())
            .finish()
    }
}

/// Decrements a member's in-flight count when the request is done.
pub struct InFlightGuard(Arc<Member>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Member {
    fn new(group: &str, addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is a valid authority"),
            weight,
            labels: MemberLabels {
                group: group.to_string(),
                member: addr.to_string(),
            },
            requests: OnceLock::new(),
            active_up: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// True when the member may take traffic: up by active checks and not ejected.
    pub fn is_available(&self) -> bool {
        self.is_active_up() && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    /// Up as far as active health checks know (ejections aside).
    pub fn is_active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops (the pipeline keeps it with the
    /// response body).
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    /// Passive health: a success resets the failure streak; `fall` consecutive failures eject
    /// the member for `ejection_ms`, doubled per repeated ejection (up to 8x). A member that
    /// has been back and answering for as long as its last ejection lasted starts over at
    /// `ejection_ms`.
    pub fn record_outcome(&self, success: bool, passive: &PassiveHealthConfig, metrics: &Metrics) {
        if success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            let until = self.ejected_until_ms.load(Ordering::Relaxed);
            let last = self
                .ejections
                .load(Ordering::Relaxed)
                .saturating_sub(1)
                .min(3);
            let last_backoff = passive.ejection_ms.saturating_mul(1 << last);
            if until == 0 || now_ms() >= until.saturating_add(last_backoff) {
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
            }
            return;
        }
        if passive.consecutive_failures == 0 {
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.consecutive_failures {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(3);
            let backoff = passive.ejection_ms.saturating_mul(1 << n);
            self.ejected_until_ms
                .store(now_ms().saturating_add(backoff), Ordering::Relaxed);
            tracing::warn!(member = %self.addr, backoff_ms = backoff, "upstream member ejected");
            self.publish_health(metrics);
        }
    }

    /// Active health: sets the up/down state (after rise/fall counting by the checker).
    pub fn set_active_up(&self, up: bool, metrics: &Metrics) {
        let was = self.active_up.swap(up, Ordering::Relaxed);
        if was != up {
            tracing::warn!(member = %self.addr, up, "upstream member health changed");
            if up {
                self.ejected_until_ms.store(0, Ordering::Relaxed);
            }
        }
        self.publish_health(metrics);
    }

    /// Takes over the health of the same member in the previous config generation, so a
    /// reload neither revives a dead member nor forgets an ejection.
    /// Takes the health state of `previous` (the same member in the config being replaced);
    /// its active state only when this group still has health checks (`checked`): without
    /// them, nothing would ever bring a member marked down back.
    pub fn inherit_health(&self, previous: &Member, checked: bool) {
        let relaxed = Ordering::Relaxed;
        if checked {
            self.active_up
                .store(previous.active_up.load(relaxed), relaxed);
        }
        self.ejected_until_ms
            .store(previous.ejected_until_ms.load(relaxed), relaxed);
        self.ejections
            .store(previous.ejections.load(relaxed), relaxed);
        self.consecutive_failures
            .store(previous.consecutive_failures.load(relaxed), relaxed);
    }

    pub fn publish_health(&self, metrics: &Metrics) {
        metrics
            .member_healthy
            .get_or_create(&self.labels)
            .set(i64::from(self.is_available()));
    }

    /// Counts a request sent to the member.
    pub fn count_request(&self, metrics: &Metrics) {
        self.requests
            .get_or_init(|| {
                metrics
                    .upstream_requests
                    .get_or_create(&self.labels)
                    .clone()
            })
            .inc();
    }
}

/// A configured group of members.
pub struct UpstreamGroup {
    pub name: String,
    pub members: Vec<Arc<Member>>,
    balancer: Balancer,
    hash_on: Option<HashOn>,
    pub passive: PassiveHealthConfig,
    pub request_timeout: Duration,
    pub retries: RetryConfig,
    /// Retry budget in thousandths of a retry.
    retry_tokens: AtomicI64,
    clients: Clients,
    /// What the client speaks to the members.
    pub protocol: UpstreamProtocol,
    /// `https` for groups with TLS, else `http`.
    pub scheme: http::uri::Scheme,
}

impl std::fmt::Debug for UpstreamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamGroup")
            .field("name", &self.name)
            .field("members", &self.members)
            .finish()
    }
}

/// Retries always allowed before the request-rate budget kicks in, and the most saved up.
const RETRY_RESERVE: i64 = 10_000;
const RETRY_MAX: i64 = 100_000;

/// The clients that reach a group's members.
enum Clients {
    /// HTTP/1.1: one client for every member; the request names the member to dial (the
    /// address [`GroupClient::request`] gets, and for hyper-util's client its URI).
    Shared(Box<GroupClient>),
    /// HTTP/2: requests name the client's host as `:authority` in their URI, so the member to
    /// dial cannot come from the URI: one client per member (by index), pinned to it.
    PerMember(Vec<GroupClient>),
}

impl Clients {
    fn build(
        config: &UpstreamGroupConfig,
        cache: &ClientCache,
        tls: Option<crate::tls::UpstreamTls>,
        members: &[Arc<Member>],
        metrics: &Arc<Metrics>,
    ) -> Self {
        let get = |pin| {
            let settings = ClientSettings {
                connect_timeout: Duration::from_millis(*config.connect_timeout_ms.get_ref()),
                idle_timeout: Duration::from_millis(*config.idle_timeout_ms.get_ref()),
                max_idle_per_member: config.max_idle_per_member,
                protocol: config.protocol,
                pin,
            };
            cache.get(settings, tls.clone(), metrics)
        };
        match config.protocol {
            UpstreamProtocol::Http1 => Self::Shared(Box::new(get(None))),
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
                Self::PerMember(members.iter().map(|m| get(Some(m.addr))).collect())
            }
        }
    }
}

impl UpstreamGroup {
    /// `tls`: the group's TLS to its members, built from `config.tls`.
    pub fn build(
        config: &UpstreamGroupConfig,
        clients: &ClientCache,
        tls: Option<crate::tls::UpstreamTls>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let name = config.name.get_ref().clone();
        let members: Vec<Arc<Member>> = config
            .members
            .get_ref()
            .iter()
            .filter_map(|m| {
                let addr = m.address.get_ref().parse().ok()?;
                Some(Arc::new(Member::new(&name, addr, m.weight)))
            })
            .collect();
        for m in &members {
            m.publish_health(metrics);
        }
        Self {
            balancer: Balancer::new(config.algorithm, &members),
            hash_on: config.hash_on.as_ref().map(|h| h.get_ref().clone()),
            passive: config.passive_health.clone(),
            request_timeout: Duration::from_millis(*config.request_timeout_ms.get_ref()),
            retries: config.retries.clone(),
            retry_tokens: AtomicI64::new(RETRY_RESERVE),
            clients: Clients::build(config, clients, tls, &members, metrics),
            scheme: if config.tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            protocol: config.protocol,
            name,
            members,
        }
    }

    /// The client that reaches member `index`.
    pub fn client_for(&self, index: usize) -> &GroupClient {
        match &self.clients {
            Clients::Shared(client) => client,
            Clients::PerMember(clients) => &clients[index],
        }
    }

    /// Members keep their health across a reload when group name and address are unchanged.
    /// Members that were in `previous` keep their health; `checked`: this group has active
    /// health checks (see [`Member::inherit_health`]).
    pub fn inherit_health(&self, previous: &UpstreamGroup, checked: bool) {
        for member in &self.members {
            if let Some(old) = previous.members.iter().find(|m| m.addr == member.addr) {
                member.inherit_health(old, checked);
            }
        }
    }

    /// The consistent-hash key of a request, if the group hashes.
    pub fn request_hash(&self, headers: &HeaderMap, client_ip: IpAddr) -> Option<u64> {
        let key: Vec<u8> = match self.hash_on.as_ref()? {
            HashOn::Header(name) => headers.get(name.as_str())?.as_bytes().to_vec(),
            HashOn::Cookie(name) => cookie_value(headers, name)?.into_bytes(),
            HashOn::ClientIp => client_ip.to_string().into_bytes(),
        };
        Some(hash_bytes(&key))
    }

    /// Picks an available member not in `tried`. When every one left is ejected by passive
    /// health, one of those is picked anyway: ejections come from answers (a 5xx that a
    /// client's own request may cause), and must never take the whole group down, as nginx
    /// retries all its peers once every one has failed and Envoy routes to all hosts in
    /// panic mode. Members that active health checks found down stay out: a group with none
    /// up answers 503.
    pub fn pick(&self, hash: Option<u64>, tried: &[usize]) -> Option<usize> {
        let retry = !tried.is_empty();
        self.balancer
            .pick(
                &self.members,
                |i| !tried.contains(&i) && self.members[i].is_available(),
                hash,
                retry,
            )
            .or_else(|| {
                self.balancer.pick(
                    &self.members,
                    |i| !tried.contains(&i) && self.members[i].is_active_up(),
                    hash,
                    retry,
                )
            })
    }

    /// Every request adds `budget_percent`% of a retry to the budget.
    pub fn deposit_retry_budget(&self) {
        let add = i64::from(self.retries.budget_percent) * 10;
        let _ = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + add).min(RETRY_MAX))
            });
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw_retry(&self) -> bool {
        self.retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= 1000).then_some(t - 1000)
            })
            .is_ok()
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn group(algorithm: &str, weights: &[u32]) -> UpstreamGroup {
        let members = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"127.0.0.1:{}\", weight = {w} }}", 9000 + i))
            .collect::<Vec<_>>()
            .join(", ");
        let hash = if algorithm == "consistent_hash" {
            "hash_on = { header = \"x-user\" }\n"
        } else {
            ""
        };
        let text = format!(
            "[[upstreams]]\nname = \"g\"\nalgorithm = \"{algorithm}\"\n{hash}members = [{members}]\n"
        );
        let config = Config::from_toml_str(&text).unwrap();
        UpstreamGroup::build(
            &config.upstreams[0],
            &ClientCache::default(),
            None,
            &Arc::new(Metrics::new()),
        )
    }

    fn counts(g: &UpstreamGroup, n: usize) -> Vec<usize> {
        let mut counts = vec![0; g.members.len()];
        for _ in 0..n {
            counts[g.pick(None, &[]).unwrap()] += 1;
        }
        counts
    }

    #[tokio::test]
    async fn round_robin_is_exact() {
        assert_eq!(
            counts(&group("round_robin", &[1, 1, 1]), 30),
            vec![10, 10, 10]
        );
    }

    #[tokio::test]
    async fn smooth_weighted_is_exact_per_cycle_and_interleaved() {
        let g = group("weighted", &[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| g.pick(None, &[]).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&g, 700), vec![500, 100, 100]);
    }

    #[tokio::test]
    async fn least_request_prefers_idle_members() {
        let g = group("least_request", &[1, 1]);
        let _busy = g.members[0].start_request();
        assert_eq!(counts(&g, 50), vec![0, 50]);
    }

    #[tokio::test]
    async fn ejected_members_are_skipped_and_none_left_is_none() {
        let g = group("round_robin", &[1, 1]);
        let m = Metrics::new();
        for _ in 0..3 {
            g.members[0].record_outcome(false, &g.passive, &m);
        }
        assert_eq!(counts(&g, 10), vec![0, 10]);
        // Every member ejected: they are picked anyway, not none.
        for _ in 0..3 {
            g.members[1].record_outcome(false, &g.passive, &m);
        }
        assert_eq!(counts(&g, 10), vec![5, 5]);
        // Down by active health checks: never picked; none left up is none.
        g.members[1].set_active_up(false, &m);
        assert_eq!(counts(&g, 10), vec![10, 0]);
        g.members[0].set_active_up(false, &m);
        assert_eq!(g.pick(None, &[]), None);
    }

    #[tokio::test]
    async fn ejection_backoff_resets_once_the_member_stays_healthy() {
        let text = "[[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:9000\" }]\n\
passive_health = { consecutive_failures = 1, ejection_ms = 100 }\n";
        let config = Config::from_toml_str(text).unwrap();
        let m = Arc::new(Metrics::new());
        let g = UpstreamGroup::build(&config.upstreams[0], &ClientCache::default(), None, &m);
        let member = &g.members[0];
        let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
        // Failing again right after coming back doubles the ejection.
        member.record_outcome(false, &g.passive, &m);
        assert!(!member.is_available());
        sleep(150).await;
        assert!(member.is_available());
        member.record_outcome(false, &g.passive, &m);
        sleep(150).await;
        assert!(!member.is_available(), "second ejection lasts 200 ms");
        sleep(100).await;
        assert!(member.is_available());
        // Healthy for longer than it was out: the next ejection is the first length again.
        for _ in 0..3 {
            member.record_outcome(true, &g.passive, &m);
            sleep(100).await;
        }
        member.record_outcome(true, &g.passive, &m);
        member.record_outcome(false, &g.passive, &m);
        assert!(!member.is_available());
        sleep(150).await;
        assert!(
            member.is_available(),
            "a member healthy for a while is ejected for ejection_ms again"
        );
    }

    #[tokio::test]
    async fn retry_budget_runs_out() {
        let g = group("round_robin", &[1]);
        let allowed = (0..100).filter(|_| g.withdraw_retry()).count();
        assert_eq!(allowed, 10);
        for _ in 0..10 {
            g.deposit_retry_budget();
        }
        assert!(g.withdraw_retry());
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; sid=xyz; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, "sid").as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&h, "nope"), None);
    }
}
