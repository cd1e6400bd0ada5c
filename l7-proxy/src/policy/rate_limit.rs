//! Rate limiting with GCRA (the generic cell rate algorithm, a token bucket stored as one
//! timestamp per key).
//!
//! Data in: each request is mapped to a key (`client_ip`, `jwt_sub` from
//! [`super::jwt::JwtClaims`], `api_key` from [`super::api_key::ApiKeyId`], or `header:<name>`).
//! A request without its key (no token, no API key, no such header) is limited by its client
//! IP instead, as Kong does, in buckets of their own: a client cannot spend another's budget
//! by sending its address as the key. A key may send `burst` requests at once and then one
//! every `period_secs / requests`. The state lives in process memory, or in Redis when
//! `redis_url` is set so several proxy instances share one bucket: a Lua script runs the same
//! algorithm atomically with Redis's clock. Redis keys are `<redis_prefix>:key:<key>` and
//! `<redis_prefix>:ip:<address>`; the prefix defaults to
//! `l7rl:<route name>:<requests>/<period_secs>s/<burst>/<key source>` (for example
//! `l7rl:orders:5/1s/5/client_ip`), so the limits of different routes, and different limits
//! of one route, never share buckets, while the same limit on every instance does. Limits
//! that should share buckets across routes name the same `redis_prefix`. When Redis is
//! unreachable, `on_redis_error` decides between letting the request through (`fail_open`)
//! and answering 503 (`fail_closed`).
//!
//! Data out: a limited request answers 429 with `Retry-After`; an admitted one carries
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` on its response. When
//! several limits apply to one request, the headers are those of the limit with the fewest
//! requests remaining (the one that will refuse first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use redis::aio::MultiplexedConnection;
use serde::Deserialize;

use super::jwt::JwtClaims;
use super::respond::{error_response, number_header};
use super::{Decided, PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "rate_limit", requests = 100, period_secs = 60, key = "client_ip" }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests admitted per period on average.
    pub requests: u64,
    #[serde(default = "default_period_secs")]
    pub period_secs: u64,
    /// Requests admitted back to back; defaults to `requests`.
    #[serde(default)]
    pub burst: Option<u64>,
    /// `client_ip`, `jwt_sub`, `api_key` or `header:<name>`.
    #[serde(default = "default_key")]
    pub key: String,
    /// `redis://host:port/db`: share buckets through Redis.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Prefix of Redis keys: `l7rl:<route name>:<requests>/<period_secs>s/<burst>/<key>` by
    /// default; limits given the same prefix share their buckets.
    #[serde(default)]
    pub redis_prefix: Option<String>,
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    #[serde(default)]
    pub on_redis_error: RedisErrorMode,
}

fn default_period_secs() -> u64 {
    60
}
fn default_key() -> String {
    "client_ip".into()
}
fn default_redis_timeout_ms() -> u64 {
    250
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RedisErrorMode {
    #[default]
    FailOpen,
    FailClosed,
}

/// What a request is limited by.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    ClientIp,
    JwtSubject,
    ApiKey,
    Header(HeaderName),
}

impl KeySource {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "client_ip" => Ok(Self::ClientIp),
            "jwt_sub" => Ok(Self::JwtSubject),
            "api_key" => Ok(Self::ApiKey),
            other => match other.strip_prefix("header:") {
                Some(h) => HeaderName::try_from(h)
                    .map(Self::Header)
                    .map_err(|e| format!("key: {e}")),
                None => Err(format!(
                    "key: expected client_ip, jwt_sub, api_key or header:<name>, got {other:?}"
                )),
            },
        }
    }

    /// Calls `f` with the request's bucket key: `key:<value>`, or `ip:<client address>` for
    /// `client_ip` and for requests that lack the key's source (limited by their address, in
    /// buckets no key value can name). Keys up to 128 bytes are built without allocating.
    fn with_key<R>(
        &self,
        req: &Request<ProxyBody>,
        ctx: &RequestCtx,
        f: impl FnOnce(&str) -> R,
    ) -> R {
        let value = match self {
            Self::ClientIp => None,
            Self::JwtSubject => ctx.identity.jwt.as_ref().and_then(JwtClaims::subject),
            Self::ApiKey => ctx.identity.api_key.as_ref().map(|k| k.0.as_str()),
            Self::Header(h) => req.headers().get(h).and_then(|v| v.to_str().ok()),
        };
        let mut key = KeyBuf::default();
        match value {
            Some(v) => {
                key.0.extend_from_slice(b"key:");
                key.0.extend_from_slice(v.as_bytes());
            }
            None => {
                use std::fmt::Write;
                let _ = write!(key, "ip:{}", ctx.client_addr.ip().to_canonical());
            }
        }
        f(key.as_str())
    }
}

/// A bucket key under construction: on the stack up to 128 bytes, on the heap beyond.
#[derive(Default)]
struct KeyBuf(smallvec::SmallVec<[u8; 128]>);

impl KeyBuf {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are written in, so the bytes are UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Write for KeyBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// GCRA parameters in microseconds (milliseconds would cap a key at 1000 requests/s).
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// Time one request "costs".
    pub emission_us: u64,
    pub burst: u64,
}

/// Result of one GCRA step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub reset_us: u64,
    /// Microseconds until a request would be admitted (0 when allowed).
    pub retry_after_us: u64,
}

impl Gcra {
    /// One request at `now` against the stored theoretical arrival time. Returns the decision
    /// and the new TAT to store (unchanged when denied). The Lua script mirrors this.
    pub fn step(&self, tat: Option<u64>, now: u64) -> (Decision, Option<u64>) {
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = tat.saturating_add(self.emission_us);
        let window = self.burst.saturating_mul(self.emission_us);
        let allow_at = new_tat.saturating_sub(window);
        if allow_at > now {
            let d = Decision {
                allowed: false,
                remaining: 0,
                reset_us: tat - now,
                retry_after_us: allow_at - now,
            };
            return (d, None);
        }
        let d = Decision {
            allowed: true,
            remaining: (now.saturating_add(window) - new_tat) / self.emission_us,
            reset_us: new_tat - now,
            retry_after_us: 0,
        };
        (d, Some(new_tat))
    }
}

/// Same algorithm as [`Gcra::step`], atomically in Redis with the server's clock so instances
/// with skewed clocks agree. Returns {allowed, remaining, reset_us, retry_after_us}.
const GCRA_LUA: &str = r#"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local window = burst * emission
local allow_at = new_tat - window
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now + window - new_tat) / emission), new_tat - now, 0}
"#;

/// In-process buckets: key → TAT in µs since `epoch`.
struct LocalBuckets {
    epoch: Instant,
    tats: Mutex<Tats>,
}

#[derive(Default)]
struct Tats {
    /// Hashed with foldhash, randomly seeded (as quick_cache's maps and hashbrown's default):
    /// a fraction of SipHash's cost on short keys.
    map: HashMap<String, u64, foldhash::fast::RandomState>,
    /// The size at which expired entries are dropped next: twice what the last pruning left
    /// (at least [`LOCAL_PRUNE_AT`]), so pruning stays amortized O(1) per request even when
    /// most keys are live (before, every request rescanned the whole map once it held
    /// 100 000 live keys).
    prune_at: usize,
}

const LOCAL_PRUNE_AT: usize = 100_000;

impl LocalBuckets {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(Tats {
                map: HashMap::default(),
                prune_at: LOCAL_PRUNE_AT,
            }),
        }
    }

    /// One GCRA step for `key` at `now` (the request's time).
    fn check(&self, gcra: Gcra, key: &str, now: Instant) -> Decision {
        let now = now.saturating_duration_since(self.epoch).as_micros() as u64;
        let mut guard = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        let Tats {
            map: tats,
            prune_at,
        } = &mut *guard;
        if tats.len() >= *prune_at {
            // A TAT in the past means a full bucket, the same as no entry.
            tats.retain(|_, tat| *tat > now);
            *prune_at = (tats.len() * 2).max(LOCAL_PRUNE_AT);
        }
        match tats.get_mut(key) {
            Some(tat) => {
                let (decision, new_tat) = gcra.step(Some(*tat), now);
                *tat = new_tat.unwrap_or(*tat);
                decision
            }
            None => {
                let (decision, new_tat) = gcra.step(None, now);
                if let Some(t) = new_tat {
                    tats.insert(key.to_string(), t);
                }
                decision
            }
        }
    }
}

struct RedisBuckets {
    client: redis::Client,
    conn: std::sync::Mutex<RedisConn>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    script: redis::Script,
    /// `None`: `l7rl:<route name>:<limit>`.
    prefix: Option<String>,
    /// The `<limit>` of the default prefix: `<requests>/<period_secs>s/<burst>/<key source>`.
    limit: String,
    timeout: Duration,
}

/// The connection to Redis, made on first use and made again after it fails.
///
/// redis-rs's `ConnectionManager` would reconnect by itself, but after a failed reconnection
/// (Redis still down) it can keep handing out that failure for good (redis-rs issue 1556), so
/// a restarted Redis was never used again. Here a connection that fails is forgotten, and the
/// next request connects anew, at most once per [`RECONNECT_BACKOFF`] while connecting fails:
/// meanwhile requests get the error at once, without waiting `redis_timeout_ms` each.
#[derive(Default)]
struct RedisConn {
    /// The live connection, with its number (to forget only the one that failed).
    live: Option<(u64, MultiplexedConnection)>,
    made: u64,
    /// After a failed attempt: no new attempt before this instant.
    retry_at: Option<Instant>,
    /// The failed attempt's error.
    last_error: String,
}

/// The least time between two attempts to connect to Redis while it is unreachable.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// Whether `e` means the connection is no longer usable (rather than a refusal by Redis,
/// such as a script error, on a healthy connection).
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

impl RedisBuckets {
    fn state(&self) -> std::sync::MutexGuard<'_, RedisConn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, or a new one; an error while connecting is backed off.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), String> {
        let ready = |state: &RedisConn| -> Option<Result<(u64, MultiplexedConnection), String>> {
            if let Some(live) = &state.live {
                return Some(Ok(live.clone()));
            }
            let backing_off = state.retry_at.is_some_and(|t| Instant::now() < t);
            backing_off.then(|| Err(format!("unreachable ({}); retrying", state.last_error)))
        };
        if let Some(r) = ready(&self.state()) {
            return r;
        }
        let _one = self.connecting.lock().await;
        if let Some(r) = ready(&self.state()) {
            return r;
        }
        let made = self.client.get_multiplexed_async_connection().await;
        let mut state = self.state();
        match made {
            Ok(conn) => {
                state.made += 1;
                state.retry_at = None;
                state.live = Some((state.made, conn.clone()));
                Ok((state.made, conn))
            }
            Err(e) => {
                state.retry_at = Some(Instant::now() + RECONNECT_BACKOFF);
                state.last_error = e.to_string();
                Err(e.to_string())
            }
        }
    }

    /// Forgets connection `number` (if it is still the live one): the next request connects.
    fn forget(&self, number: u64) {
        let mut state = self.state();
        if state.live.as_ref().is_some_and(|(n, _)| *n == number) {
            state.live = None;
        }
    }

    /// `key` is the full Redis key (prefix included).
    async fn check(&self, gcra: Gcra, key: String) -> Result<Decision, String> {
        // The connection in use, forgotten if the whole call times out on it.
        let in_use = std::sync::atomic::AtomicU64::new(0);
        let run = async {
            // A connection that broke since its last use (Redis restarted) fails the first
            // call: the second goes over a new connection.
            let mut attempts = 0;
            loop {
                attempts += 1;
                let (number, mut conn) = self.connection().await?;
                in_use.store(number, std::sync::atomic::Ordering::Relaxed);
                let r: Result<Vec<i64>, _> = self
                    .script
                    .key(&key)
                    .arg(gcra.emission_us)
                    .arg(gcra.burst)
                    .invoke_async(&mut conn)
                    .await;
                match r {
                    Ok(r) => return Ok(r),
                    Err(e) if connection_lost(&e) => {
                        self.forget(number);
                        if attempts == 2 {
                            return Err(e.to_string());
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let r = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r?,
            Err(_) => {
                // No answer in time: the connection may be dead without an error (a peer gone
                // without a reset); the next request connects anew. No connection at all:
                // connecting hangs (a host that drops packets), which is backed off too.
                match in_use.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => {
                        let mut state = self.state();
                        if state.live.is_none() {
                            state.retry_at = Some(Instant::now() + RECONNECT_BACKOFF);
                            state.last_error = "connecting timed out".into();
                        }
                    }
                    number => self.forget(number),
                }
                return Err("timed out".into());
            }
        };
        let [allowed, remaining, reset_us, retry_after_us] = r[..] else {
            return Err(format!("unexpected script reply {r:?}"));
        };
        Ok(Decision {
            allowed: allowed == 1,
            remaining: remaining.max(0) as u64,
            reset_us: reset_us.max(0) as u64,
            retry_after_us: retry_after_us.max(0) as u64,
        })
    }
}

enum Store {
    Local(LocalBuckets),
    Redis(Box<RedisBuckets>),
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

pub struct RateLimitPolicy {
    gcra: Gcra,
    /// `RateLimit-Limit`, the same on every response.
    limit_header: HeaderValue,
    key: KeySource,
    store: Store,
    on_redis_error: RedisErrorMode,
}

impl RateLimitPolicy {
    pub fn build(config: RateLimitConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "rate_limit".into(),
            message,
        };
        if config.requests == 0 || config.period_secs == 0 {
            return Err(err("requests and period_secs must be positive".into()));
        }
        super::check_secs("period_secs", config.period_secs).map_err(err)?;
        if config.redis_url.is_none() && config.redis_prefix.is_some() {
            return Err(err(
                "redis_prefix needs redis_url: without Redis, buckets are kept in memory".into(),
            ));
        }
        if config.redis_url.is_some() && config.redis_timeout_ms == 0 {
            return Err(err(
                "redis_timeout_ms must be at least 1: 0 would time out every Redis call".into(),
            ));
        }
        let burst = config.burst.unwrap_or(config.requests);
        if burst == 0 {
            return Err(err("burst must be positive".into()));
        }
        let emission_us = (config.period_secs.saturating_mul(1_000_000) / config.requests).max(1);
        let key = KeySource::parse(&config.key).map_err(err)?;
        let store = match &config.redis_url {
            Some(url) => Store::Redis(Box::new(RedisBuckets {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| err(format!("redis_url {url:?}: {e}")))?,
                conn: std::sync::Mutex::default(),
                connecting: tokio::sync::Mutex::new(()),
                script: redis::Script::new(GCRA_LUA),
                prefix: config.redis_prefix.clone(),
                limit: format!(
                    "{}/{}s/{burst}/{}",
                    config.requests, config.period_secs, config.key
                ),
                timeout: Duration::from_millis(config.redis_timeout_ms),
            })),
            None => Store::Local(LocalBuckets::new()),
        };
        Ok(Self {
            gcra: Gcra { emission_us, burst },
            limit_header: HeaderValue::from(burst),
            key,
            store,
            on_redis_error: config.on_redis_error,
        })
    }

    /// The request phase's end, once the bucket decided: 429, or on with the decision kept
    /// for the response's headers.
    fn decided(&self, ctx: &mut RequestCtx, decision: Decision) -> Decided {
        if !decision.allowed {
            let mut resp: Response<ProxyBody> =
                error_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            self.set_headers(resp.headers_mut(), &decision);
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                number_header(decision.retry_after_us.div_ceil(1_000_000).max(1)),
            );
            return Decided::Respond(resp);
        }
        ctx.set_state(PhaseState::RateLimit(decision));
        Decided::Continue
    }

    /// Sets the `RateLimit-*` headers, unless another limit of the chain already set them
    /// with fewer requests remaining: clients should see the limit that refuses first.
    fn set_headers(&self, headers: &mut HeaderMap, d: &Decision) {
        // One lookup of the name for both the check and the insert.
        match headers.entry(RATELIMIT_REMAINING) {
            http::header::Entry::Occupied(mut set) => {
                let stricter = set
                    .get()
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|other| other < d.remaining);
                if stricter {
                    return;
                }
                set.insert(number_header(d.remaining));
            }
            http::header::Entry::Vacant(unset) => {
                unset.insert(number_header(d.remaining));
            }
        }
        headers.insert(RATELIMIT_LIMIT, self.limit_header.clone());
        headers.insert(
            RATELIMIT_RESET,
            number_header(d.reset_us.div_ceil(1_000_000)),
        );
    }
}

impl Policy for RateLimitPolicy {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        // Local buckets decide at once; Redis is waited for.
        let Store::Local(local) = &self.store else {
            return Decided::Wait;
        };
        let now = ctx.received;
        let decision = self
            .key
            .with_key(req, ctx, |k| local.check(self.gcra, k, now));
        self.decided(ctx, decision)
    }

    async fn on_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> RequestOutcome {
        let redis = match &self.store {
            Store::Redis(redis) => redis,
            Store::Local(_) => {
                return self.try_request(&mut req, ctx).outcome(req);
            }
        };
        let key = self.key.with_key(&req, ctx, |k| match &redis.prefix {
            Some(prefix) => format!("{prefix}:{k}"),
            None => format!("l7rl:{}:{}:{k}", ctx.route_name, redis.limit),
        });
        // Boxed so the Redis client's large future does not sit in every request's future
        // (local buckets need none).
        let decision = match Box::pin(redis.check(self.gcra, key)).await {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(%error, mode = ?self.on_redis_error, "rate_limit: redis unavailable");
                if self.on_redis_error == RedisErrorMode::FailClosed {
                    return RequestOutcome::Respond(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "rate limiter unavailable",
                    ));
                }
                return RequestOutcome::Continue(req);
            }
        };
        self.decided(ctx, decision).outcome(req)
    }

    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        if let PhaseState::RateLimit(d) = ctx.take_state() {
            self.set_headers(resp.headers_mut(), &d);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_burst_then_refills() {
        let g = Gcra {
            emission_us: 1_000_000,
            burst: 3,
        };
        let mut tat = None;
        let mut remaining = vec![];
        for _ in 0..3 {
            let (d, t) = g.step(tat, 0);
            assert!(d.allowed);
            remaining.push(d.remaining);
            tat = t;
        }
        assert_eq!(remaining, [2, 1, 0]);
        let (d, t) = g.step(tat, 0);
        assert!(!d.allowed);
        assert_eq!(t, None);
        assert_eq!(d.retry_after_us, 1_000_000);
        // One emission interval later one request fits again.
        let (d, _) = g.step(tat, 1_000_000);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn rates_above_1000_per_second_are_honoured() {
        let config: RateLimitConfig =
            toml::from_str("requests = 5000\nperiod_secs = 1\nburst = 1").unwrap();
        let p = RateLimitPolicy::build(config).unwrap();
        assert_eq!(p.gcra.emission_us, 200);
        let (d, tat) = p.gcra.step(None, 0);
        assert!(d.allowed);
        assert!(!p.gcra.step(tat, 100).0.allowed, "half an interval later");
        assert!(
            p.gcra.step(tat, 200).0.allowed,
            "one interval (200 µs) later"
        );
    }

    #[test]
    fn local_pruning_is_amortized_when_keys_stay_live() {
        let local = LocalBuckets::new();
        let gcra = Gcra {
            emission_us: 60_000_000,
            burst: 1,
        };
        let now = Instant::now();
        for i in 0..LOCAL_PRUNE_AT {
            local.check(gcra, &format!("key:{i}"), now);
        }
        // Every key is live: one scan, then none until the map doubles.
        local.check(gcra, "key:next", now);
        let tats = local.tats.lock().unwrap();
        assert_eq!(tats.prune_at, 2 * LOCAL_PRUNE_AT);
        assert_eq!(tats.map.len(), LOCAL_PRUNE_AT + 1);
        drop(tats);
        // Expired entries go at the next scan.
        let later = now + Duration::from_secs(61);
        for i in 0..LOCAL_PRUNE_AT {
            local.check(gcra, &format!("other:{i}"), later);
        }
        let tats = local.tats.lock().unwrap();
        // The scan came when the map reached 200 000 entries (100 001 expired, 99 999 live).
        assert_eq!(tats.map.len(), LOCAL_PRUNE_AT);
        assert!(tats.map.keys().all(|k| k.starts_with("other:")));
        assert_eq!(tats.prune_at, 2 * (LOCAL_PRUNE_AT - 1));
    }

    #[test]
    fn key_sources_parse() {
        assert_eq!(KeySource::parse("jwt_sub"), Ok(KeySource::JwtSubject));
        assert!(matches!(
            KeySource::parse("header:x-user"),
            Ok(KeySource::Header(_))
        ));
        assert!(KeySource::parse("cookie").is_err());
    }
}
