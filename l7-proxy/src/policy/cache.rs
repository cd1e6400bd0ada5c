//! In-memory response cache with request coalescing.
//!
//! Data in: GET and HEAD requests. The cache key is method + upstream group (as chosen by the
//! policies before this one, e.g. `version`) + host + path + query, plus the values of the
//! request headers the stored response named in `Vary`. A request with
//! `Cache-Control: no-store` bypasses the cache; `no-cache`, or a `max-age` the entry's age
//! exceeds (`max-age=0`), forces revalidation.
//!
//! A fresh entry answers directly (`X-Cache: HIT`, `Age`), as 304 when the request's
//! `If-None-Match` matches its `ETag` (or, without `If-None-Match`, its `If-Modified-Since` is
//! not before the entry's `Last-Modified`); a `Range` is not served from the cache (the whole
//! 200 is sent). A stale entry with a validator is revalidated: the request goes upstream with
//! `If-None-Match` (its `ETag`) or else `If-Modified-Since` (its `Last-Modified`), and a 304
//! updates the entry (its headers replace the
//! stored ones, and the freshness is computed again from the result, RFC 9111 section 4.3.4)
//! and answers from it.
//!
//! An entry's age counts from the upstream's `Age` when it was received (RFC 9111 section
//! 4.2.3): `max-age=60` with `Age: 50` is fresh for 10 more seconds, and the `Age` sent on a
//! hit includes those 50.
//! A request that goes upstream for the cache (a miss or a revalidation) goes without the
//! client's `If-None-Match`, `If-Modified-Since`, `Range` and `If-Range`, as with nginx and
//! Varnish: the upstream answers the full 200, which can be stored, and the client's
//! validators are checked against it (a 304 when they match). A request with a precondition
//! (`If-Match`, `If-Unmodified-Since`) bypasses the cache, so the origin evaluates it (RFC 9111
//! section 4.3.2).
//! Concurrent misses for one key are coalesced: the first goes upstream, the others wait for
//! its result and answer from it (or go upstream themselves when it was not cacheable).
//!
//! A key whose last response could not be stored is remembered as uncacheable for
//! `uncacheable_secs` (Varnish's hit-for-miss): its requests go to the upstream at once instead
//! of queueing behind one another, and the first storable response ends that state.
//!
//! Data out: a 200 response to GET/HEAD whose `Cache-Control` allows shared caching (not
//! no-store/private), whose freshness lifetime (s-maxage, else max-age, else `Expires` minus
//! `Date`, else `default_ttl_secs`) exceeds its `Age`, and whose body fits `max_body_bytes`
//! is stored in a bounded quick_cache cache (weighed by body size) and sent with `X-Cache: MISS`.
//! Responses that set cookies, say `Vary: *`, or answer an authorized request without
//! `public` / `s-maxage` / `must-revalidate` are not stored. An invalid `max-age` / `s-maxage`
//! value, or an `Expires` that is invalid (such as `0`) or in the past, means already stale, so
//! not stored (RFC 9111 sections 4.2.1 and 5.3); `Expires` is read in all three HTTP date
//! formats (the `httpdate` crate). A request is authorized when it
//! carries `Authorization` or an authentication policy (`jwt`, `api_key`, `basic_auth`)
//! accepted it: those may remove the credentials before the cache sees the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use quick_cache::sync::Cache;
use serde::Deserialize;
use tokio::sync::watch;

use super::respond::{
    content_length, directives, full, has_directive, number_header, read_limited, ReadError,
};
use super::{Decided, PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};
use crate::pipeline::headers::list_items;

/// `{ type = "cache", max_bytes = 67108864, max_body_bytes = 1048576 }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Total body bytes kept.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Larger responses are passed through uncached.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Freshness of responses without max-age / s-maxage / Expires; 0 = do not cache those.
    #[serde(default)]
    pub default_ttl_secs: u64,
    /// Upper bound on any entry's lifetime.
    #[serde(default = "default_max_ttl_secs")]
    pub max_ttl_secs: u64,
    /// How long a coalesced request waits for the first one before going upstream itself.
    #[serde(default = "default_wait_ms")]
    pub coalesce_wait_ms: u64,
    /// How long a key whose response was not storable skips coalescing (0 = never skip).
    #[serde(default = "default_uncacheable_secs")]
    pub uncacheable_secs: u64,
}

fn default_uncacheable_secs() -> u64 {
    120
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// What is known about a base key (method, host, path and query).
#[derive(Debug)]
enum KeyInfo {
    /// Stored responses vary on these request headers.
    Vary(Vec<HeaderName>),
    /// The last response was not storable: requests skip coalescing until `until`.
    Uncacheable { until: Instant },
}

fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_max_ttl_secs() -> u64 {
    86_400
}
fn default_wait_ms() -> u64 {
    10_000
}

/// One stored response.
#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// When the response was stored or last revalidated.
    stored_at: Instant,
    /// Its age then: the upstream's `Age` (RFC 9111 section 4.2.3).
    initial_age: Duration,
    /// Freshness lifetime.
    ttl: Duration,
    /// Response said `no-cache`: serve only after revalidation.
    must_revalidate: bool,
}

impl Entry {
    /// An entry stored now. Its initial age is the upstream's `Age`, which is taken out of the
    /// stored headers (a hit sends the entry's current age instead).
    fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        (ttl, must_revalidate): (Duration, bool),
    ) -> Self {
        let initial_age = received_age(&headers);
        headers.remove(header::AGE);
        Self {
            status,
            headers,
            body,
            stored_at: Instant::now(),
            initial_age,
            ttl,
            must_revalidate,
        }
    }

    /// Current age: the age it had when received plus the time it has been stored.
    fn age(&self) -> Duration {
        self.initial_age.saturating_add(self.stored_at.elapsed())
    }

    fn fresh(&self) -> bool {
        !self.must_revalidate && self.age() < self.ttl
    }

    fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }
}

type Waiters = watch::Receiver<Option<Arc<Entry>>>;

/// Held by the request that went upstream for a key; dropping it releases the waiters.
struct Leader {
    key: String,
    tx: watch::Sender<Option<Arc<Entry>>>,
    inflight: Arc<Mutex<HashMap<String, Waiters>>>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Weighs an entry by its key and body, plus an allowance for its headers.
#[derive(Clone)]
struct EntryWeight;

impl quick_cache::Weighter<String, Arc<Entry>> for EntryWeight {
    fn weight(&self, key: &String, entry: &Arc<Entry>) -> u64 {
        (key.len() + entry.body.len() + 256) as u64
    }
}

/// What a request phase keeps for the response phase.
pub enum CacheState {
    /// A key known uncacheable: the request went upstream without a lookup, and its response
    /// is only checked for whether it ends that state.
    Passing(Passing),
    /// A lookup that missed (or found a stale entry to revalidate).
    Pending(Box<Pending>),
    /// A miss while another request fetches the same response: what the lookup found, kept
    /// by `try_request` so that `on_request` waits without looking up again.
    Waiting(Box<Waiting>),
}

/// See [`CacheState::Waiting`].
pub struct Waiting {
    found: Found,
    rx: Waiters,
}

/// See [`CacheState::Passing`].
pub struct Passing {
    base_key: String,
    authorized: bool,
}

/// See [`CacheState::Pending`].
pub struct Pending {
    base_key: String,
    vary_key: String,
    leader: Option<Arc<Leader>>,
    /// Stale entry being revalidated with `If-None-Match`.
    revalidating: Option<Arc<Entry>>,
    /// The client's own validators, to answer 304 from the full response.
    client: Conditionals,
    /// The request carried `Authorization` or was accepted by an authentication policy.
    authorized: bool,
    request_headers: HeaderMap,
}

pub struct CachePolicy {
    config: CacheConfig,
    entries: Cache<String, Arc<Entry>, EntryWeight>,
    /// Base key → header names the stored response varies on, or its uncacheable state.
    vary: Cache<String, Arc<KeyInfo>>,
    inflight: Arc<Mutex<HashMap<String, Waiters>>>,
}

impl CachePolicy {
    pub fn build(config: CacheConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "cache".into(),
            message,
        };
        if config.max_bytes == 0 {
            return Err(err(
                "max_bytes must be at least 1: a cache of 0 bytes would store nothing".into(),
            ));
        }
        if config.max_ttl_secs == 0 {
            return Err(err(
                "max_ttl_secs must be at least 1: every entry would expire at once".into(),
            ));
        }
        for (field, secs) in [
            ("default_ttl_secs", config.default_ttl_secs),
            ("max_ttl_secs", config.max_ttl_secs),
            ("uncacheable_secs", config.uncacheable_secs),
        ] {
            super::check_secs(field, secs).map_err(err)?;
        }
        let entries = Cache::with_weighter(
            (config.max_bytes / 4096).clamp(64, 1 << 20) as usize,
            config.max_bytes,
            EntryWeight,
        );
        let vary = Cache::new(100_000);
        Ok(Self {
            config,
            entries,
            vary,
            inflight: Arc::default(),
        })
    }

    /// The entry stored under `key`, unless it outlived `max_ttl_secs` (then it is dropped).
    fn lookup(&self, key: &str) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if entry.stored_at.elapsed() > Duration::from_secs(self.config.max_ttl_secs) {
            self.entries.remove(key);
            return None;
        }
        Some(entry)
    }

    fn vary_key(&self, base: &str, headers: &HeaderMap) -> String {
        key_for(base, self.vary.get(base).as_deref(), headers)
    }

    /// Remembers that `base_key`'s response could not be stored.
    fn mark_uncacheable(&self, base_key: String) {
        if self.config.uncacheable_secs > 0 {
            let until = Instant::now() + Duration::from_secs(self.config.uncacheable_secs);
            self.vary
                .insert(base_key, Arc::new(KeyInfo::Uncacheable { until }));
        }
    }

    /// Whether a response may be stored: status, `Cache-Control`, `Vary`, size and cookies.
    /// Returns its freshness and the header names it varies on.
    fn storable(
        &self,
        resp: &Response<ProxyBody>,
        authorized: bool,
    ) -> Option<((Duration, bool), Vec<HeaderName>)> {
        if resp.status() != StatusCode::OK {
            return None;
        }
        let ttl = self.ttl(resp.headers(), authorized)?;
        let vary_star = resp.headers().get_all(header::VARY).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii() == b"*")
        });
        let too_big = content_length(resp.headers())
            .is_some_and(|len| len > self.config.max_body_bytes as u64);
        // A cookie is meant for one client; storing it would hand it to everyone.
        let sets_cookie = resp.headers().contains_key(header::SET_COOKIE);
        if vary_star || too_big || sets_cookie {
            return None;
        }
        let vary_names = list_items(resp.headers(), &header::VARY)
            .filter_map(|n| HeaderName::try_from(n).ok())
            .collect();
        Some((ttl, vary_names))
    }

    /// Freshness lifetime of a response, `None` when it must not be stored. A response to an
    /// authorized request is stored only when it says `public`, `s-maxage` or
    /// `must-revalidate` (RFC 9111 section 3.5).
    fn ttl(&self, headers: &HeaderMap, authorized: bool) -> Option<(Duration, bool)> {
        // Each lookup hashes the name: without `Cache-Control` (as most API responses come),
        // one lookup answers every directive question below.
        let has_cc = headers.contains_key(header::CACHE_CONTROL);
        let has = |name: &str| has_cc && has_directive(directives(headers), name);
        if has("no-store") || has("private") {
            return None;
        }
        let shareable = ["public", "s-maxage", "must-revalidate"];
        if authorized && !shareable.iter().any(|d| has(d)) {
            return None;
        }
        // An invalid value means stale (RFC 9111 section 4.2.1).
        let secs = |name: &str| {
            if !has_cc {
                return None;
            }
            directives(headers)
                .find(|(d, _)| d.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.and_then(delta_seconds).unwrap_or(0))
        };
        let no_cache = has("no-cache");
        let ttl = secs("s-maxage")
            .or_else(|| secs("max-age"))
            .or_else(|| expires_lifetime(headers))
            .unwrap_or(self.config.default_ttl_secs)
            .min(self.config.max_ttl_secs);
        // A response that arrives stale (its `Age` is past its lifetime) is not worth storing.
        (ttl > received_age(headers).as_secs() || (no_cache && headers.contains_key(header::ETAG)))
            .then_some((Duration::from_secs(ttl), no_cache))
    }
}

/// A `delta-seconds` value; one too large to represent is taken as the largest (RFC 9111
/// section 1.2.2).
fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // RFC 9111 1.2.2: a value too large to represent counts as 2^31 seconds.
    Some(v.parse().unwrap_or(u64::MAX).min(DELTA_SECONDS_MAX))
}

/// The largest delta-seconds value a cache needs to represent (RFC 9111 1.2.2).
const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// The upstream's `Age` (zero when absent or invalid).
fn received_age(headers: &HeaderMap) -> Duration {
    let age = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.trim()));
    Duration::from_secs(age.unwrap_or(0))
}

/// Freshness lifetime given by `Expires` (RFC 9111 section 4.2.1): `Expires` minus `Date` (or
/// now, without a valid `Date`). An invalid `Expires` (such as `0`) or one in the past means
/// already stale: 0. `None` without `Expires`.
fn expires_lifetime(headers: &HeaderMap) -> Option<u64> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(0);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).map_or(0, |d| d.as_secs()))
}

/// An HTTP date (RFC 9110 section 5.6.7), in any of its three formats; `None` for anything
/// else (an `Expires` that is no date counts as already stale).
fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?.trim()).ok()
}

/// The entry key of a request for `base`, given what is `known` about that base key.
fn key_for(base: &str, known: Option<&KeyInfo>, headers: &HeaderMap) -> String {
    match known {
        Some(KeyInfo::Vary(names)) => vary_key_with(base, names, headers),
        _ => base.to_string(),
    }
}

fn vary_key_with(base: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = base.to_string();
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        key.push('=');
        for v in headers.get_all(name) {
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
            key.push(',');
        }
    }
    key
}

/// Whether `If-None-Match` names `etag`, compared weakly (RFC 9110 section 13.1.2). Entity tags
/// are quoted strings, which may contain commas.
fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let weak = |t: &'_ [u8]| -> Vec<u8> { t.strip_prefix(b"W/").unwrap_or(t).to_vec() };
    let etag = weak(etag.as_bytes().trim_ascii());
    let mut rest = if_none_match.as_bytes().trim_ascii();
    if rest == b"*" {
        return true;
    }
    loop {
        rest = rest.trim_ascii_start();
        while let Some(r) = rest.strip_prefix(b",") {
            rest = r.trim_ascii_start();
        }
        if rest.is_empty() {
            return false;
        }
        let tag = rest.strip_prefix(b"W/").unwrap_or(rest);
        let Some(quoted) = tag.strip_prefix(b"\"") else {
            // Not an entity tag: skip to the next list member.
            match rest.iter().position(|b| *b == b',') {
                Some(at) => rest = &rest[at + 1..],
                None => return false,
            }
            continue;
        };
        let Some(close) = quoted.iter().position(|b| *b == b'"') else {
            return false;
        };
        if tag[..close + 2] == etag[..] {
            return true;
        }
        rest = &quoted[close + 1..];
    }
}

/// A client's validators: `If-None-Match`, else `If-Modified-Since` (RFC 9110 section 13.2.2).
#[derive(Default)]
struct Conditionals {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
}

impl Conditionals {
    fn of(headers: &HeaderMap) -> Self {
        Self {
            if_none_match: headers.get(header::IF_NONE_MATCH).cloned(),
            if_modified_since: headers.get(header::IF_MODIFIED_SINCE).cloned(),
        }
    }

    /// Whether a response with `headers` is what the client already has (answer 304).
    fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            return headers
                .get(header::ETAG)
                .is_some_and(|etag| etag_matches(inm, etag));
        }
        let (Some(ims), Some(lm)) = (&self.if_modified_since, headers.get(header::LAST_MODIFIED))
        else {
            return false;
        };
        matches!((http_date(ims), http_date(lm)), (Some(ims), Some(lm)) if lm <= ims)
    }
}

/// Request headers that make the upstream answer something other than the full response
/// (304, 206). Like nginx and Varnish, a fetch for the cache goes without them, and the
/// client's validators are checked against the full response. (`If-Match` and
/// `If-Unmodified-Since` are left to the origin: such requests bypass the cache.)
const CLIENT_CONDITIONALS: [HeaderName; 4] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::RANGE,
    header::IF_RANGE,
];

/// A response built from `entry` for a client with validators `client`.
fn serve(entry: &Entry, client: &Conditionals, head: bool) -> Response<ProxyBody> {
    let not_modified = client.not_modified(&entry.headers);
    let mut resp = if not_modified || head {
        Response::new(super::respond::empty())
    } else {
        Response::new(full(entry.body.clone()))
    };
    *resp.headers_mut() = entry.headers.clone();
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    } else {
        *resp.status_mut() = entry.status;
    }
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("HIT"));
    resp.headers_mut()
        .insert(header::AGE, number_header(entry.age().as_secs()));
    resp
}

fn miss(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    set_miss(&mut resp);
    resp
}

fn set_miss(resp: &mut Response<ProxyBody>) {
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("MISS"));
}

/// Updates stored response headers with those of a 304 (RFC 9111 section 3.2): each header the
/// 304 carries replaces the stored one, except those describing the stored body or the
/// connection. A strong ETag does not replace the weak form of itself (a `compress` policy
/// after the cache weakened the stored one: the stored bytes are encoded).
fn update_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    const KEEP: [HeaderName; 5] = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::VARY,
        X_CACHE,
    ];
    for name in not_modified.keys() {
        if KEEP.contains(name) || HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        if name == header::ETAG {
            let weakened = match (stored.get(name), not_modified.get(name)) {
                (Some(old), Some(new)) => old
                    .as_bytes()
                    .strip_prefix(b"W/")
                    .is_some_and(|o| o == new.as_bytes()),
                _ => false,
            };
            if weakened {
                continue;
            }
        }
        stored.remove(name);
        for v in not_modified.get_all(name) {
            stored.append(name, v.clone());
        }
    }
}

/// Whether a request is authorized in the sense of RFC 9111 section 3.5: it carries
/// `Authorization`, or an authentication policy before the cache accepted it (`basic_auth`,
/// `api_key` and `jwt` may remove the credentials they checked, but the response is still
/// meant for that user). None can run after the cache: `build_chain` refuses that order.
fn authorized(req: &Request<ProxyBody>, ctx: &RequestCtx) -> bool {
    let id = &ctx.identity;
    id.jwt.is_some()
        || id.api_key.is_some()
        || id.basic_user.is_some()
        || req.headers().contains_key(header::AUTHORIZATION)
}

/// Headers that describe a connection, not the stored response.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// What the request phase found before any waiting ([`CachePolicy::begin`]).
struct Found {
    base_key: String,
    vary_key: String,
    cached: Option<Arc<Entry>>,
    /// This request fetches the response for the requests that miss the same key meanwhile.
    leader: Option<Arc<Leader>>,
    client: Conditionals,
    head: bool,
    force_revalidate: bool,
    max_age: Option<Duration>,
}

/// How the request phase goes on after [`CachePolicy::begin`].
enum Begin {
    /// Decided: not for the cache, or known uncacheable; the request goes on as it is.
    Done,
    /// Looked up: [`CachePolicy::finish`] ends the phase at once.
    Found(Found),
    /// Missed while another request fetches the same response: wait for its result first.
    Wait(Box<Waiting>),
}

impl CachePolicy {
    /// The request phase up to where it may have to wait for another request's response.
    /// Leaves `ctx` untouched when it answers [`Begin::Wait`].
    fn begin(&self, req: &Request<ProxyBody>, ctx: &mut RequestCtx) -> Begin {
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return Begin::Done;
        }
        // One pass over the request's few headers instead of a lookup (which hashes the
        // name) for each of these.
        let (mut host, mut cache_control, mut precondition) = (None, false, false);
        for (name, value) in req.headers() {
            if name == header::HOST {
                host = host.or(Some(value));
            } else if name == header::CACHE_CONTROL {
                cache_control = true;
            } else if name == header::IF_MATCH || name == header::IF_UNMODIFIED_SINCE {
                precondition = true;
            }
        }
        if cache_control && has_directive(directives(req.headers()), "no-store") {
            return Begin::Done;
        }
        // Preconditions are the origin's to evaluate (RFC 9111 section 4.3.2): such a request
        // goes upstream as it is, neither served from nor stored in the cache.
        if precondition {
            return Begin::Done;
        }
        let host = host
            .and_then(|h| h.to_str().ok())
            .or(req.uri().host())
            .unwrap_or("");
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let group = ctx.upstream_group.as_str();
        let mut base_key = String::with_capacity(
            method.as_str().len() + group.len() + 2 + host.len() + path_and_query.len(),
        );
        base_key.push_str(method.as_str());
        base_key.push(' ');
        // The group chosen so far (a `version` policy before this one may have picked it and
        // rewritten the path): another group is another origin.
        base_key.push_str(group);
        base_key.push(' ');
        let host_at = base_key.len();
        base_key.push_str(host);
        base_key[host_at..].make_ascii_lowercase();
        base_key.push_str(path_and_query);

        let known = self.vary.get(base_key.as_str());
        if let Some(KeyInfo::Uncacheable { until }) = known.as_deref() {
            if ctx.received < *until {
                ctx.set_state(PhaseState::Cache(CacheState::Passing(Passing {
                    base_key,
                    authorized: authorized(req, ctx),
                })));
                return Begin::Done;
            }
        }
        // `no-cache`, or a `max-age` the entry is older than, forces revalidation (RFC 9111
        // section 5.2.1).
        let force_revalidate =
            cache_control && has_directive(directives(req.headers()), "no-cache");
        let max_age = cache_control
            .then(|| {
                directives(req.headers())
                    .find(|(d, _)| d.eq_ignore_ascii_case("max-age"))
                    .map(|(_, v)| Duration::from_secs(v.and_then(delta_seconds).unwrap_or(0)))
            })
            .flatten();
        let client = Conditionals::of(req.headers());
        let head = method == Method::HEAD;
        let vary_key = key_for(&base_key, known.as_deref(), req.headers());
        let cached = self.lookup(&vary_key);
        let mut found = Found {
            base_key,
            vary_key,
            cached,
            leader: None,
            client,
            head,
            force_revalidate,
            max_age,
        };
        if found.cached.is_some() {
            return Begin::Found(found);
        }
        // Coalesce: the first miss leads, later ones wait for its result.
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inflight.get(&found.vary_key) {
            let rx = rx.clone();
            drop(inflight);
            return Begin::Wait(Box::new(Waiting { found, rx }));
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(found.vary_key.clone(), rx);
        drop(inflight);
        found.leader = Some(Arc::new(Leader {
            key: found.vary_key.clone(),
            tx,
            inflight: self.inflight.clone(),
        }));
        Begin::Found(found)
    }

    /// Waits for the leader fetching the same response, then serves what it stored, or goes
    /// on with a fresh lookup if it stored nothing (within `coalesce_wait_ms`).
    async fn wait_for_leader(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
        waiting: Box<Waiting>,
    ) -> RequestOutcome {
        let Waiting { mut found, mut rx } = *waiting;
        let wait = Duration::from_millis(self.config.coalesce_wait_ms);
        let _ = tokio::time::timeout(wait, rx.changed()).await;
        let result = rx.borrow().clone();
        if let Some(entry) = result {
            return RequestOutcome::Respond(serve(&entry, &found.client, found.head));
        }
        // The leader's response was not stored; recompute with what is known now.
        found.vary_key = self.vary_key(&found.base_key, req.headers());
        found.cached = self.lookup(&found.vary_key);
        self.finish(&mut req, ctx, found).outcome(req)
    }

    /// The response to a request for a key known to be uncacheable. The request headers a
    /// Vary would need were not kept: a storable response ends the state, and the next
    /// request is looked up and stored.
    fn passing(&self, resp: &mut Response<ProxyBody>, passing: Passing) {
        if self.storable(resp, passing.authorized).is_some() {
            self.vary.remove(passing.base_key.as_str());
        }
        set_miss(resp);
    }

    /// The request phase's end: a fresh entry answers; a stale one is revalidated; the
    /// request goes on with what the response phase needs kept.
    fn finish(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx, found: Found) -> Decided {
        let mut revalidating = None;
        for name in &CLIENT_CONDITIONALS {
            req.headers_mut().remove(name);
        }
        if let Some(entry) = found.cached {
            let acceptable =
                !found.force_revalidate && found.max_age.is_none_or(|max| entry.age() <= max);
            if entry.fresh() && acceptable {
                return Decided::Respond(serve(&entry, &found.client, found.head));
            }
            // Revalidate with the entry's validator: its ETag, else its Last-Modified.
            if let Some(etag) = entry.etag() {
                req.headers_mut()
                    .insert(header::IF_NONE_MATCH, etag.clone());
                revalidating = Some(entry);
            } else if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
                req.headers_mut()
                    .insert(header::IF_MODIFIED_SINCE, modified.clone());
                revalidating = Some(entry);
            }
        }
        ctx.set_state(PhaseState::Cache(CacheState::Pending(Box::new(Pending {
            base_key: found.base_key,
            vary_key: found.vary_key,
            leader: found.leader,
            revalidating,
            client: found.client,
            authorized: authorized(req, ctx),
            request_headers: req.headers().clone(),
        }))));
        Decided::Continue
    }
}

impl Policy for CachePolicy {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        match self.begin(req, ctx) {
            Begin::Done => Decided::Continue,
            Begin::Found(found) => self.finish(req, ctx, found),
            // Another request is fetching this response: `on_request` waits for it.
            Begin::Wait(waiting) => {
                ctx.set_state(PhaseState::Cache(CacheState::Waiting(waiting)));
                Decided::Wait
            }
        }
    }

    async fn on_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> RequestOutcome {
        // What `try_request` found, or, when called without it, a lookup of its own.
        let waiting = match ctx.take_state() {
            PhaseState::Cache(CacheState::Waiting(waiting)) => waiting,
            _ => match self.begin(&req, ctx) {
                Begin::Done => return RequestOutcome::Continue(req),
                Begin::Found(found) => return self.finish(&mut req, ctx, found).outcome(req),
                Begin::Wait(waiting) => waiting,
            },
        };
        // Boxed: only waiters need the timer and the lookup, not every request's future.
        Box::pin(self.wait_for_leader(req, ctx, waiting)).await
    }

    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        // A response that may be stored is read first: `on_response`.
        if matches!(ctx.state(), PhaseState::Cache(CacheState::Pending(_))) {
            return false;
        }
        if let PhaseState::Cache(CacheState::Passing(passing)) = ctx.take_state() {
            self.passing(resp, passing);
        }
        true
    }

    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let pending = match ctx.take_state() {
            PhaseState::Cache(CacheState::Pending(pending)) => pending,
            PhaseState::Cache(CacheState::Passing(passing)) => {
                let mut resp = resp;
                self.passing(&mut resp, passing);
                return resp;
            }
            _ => return resp,
        };
        let head = pending.base_key.starts_with("HEAD ");
        if let Some(stale) = &pending.revalidating {
            if resp.status() == StatusCode::NOT_MODIFIED {
                // RFC 9111 section 4.3.4: the 304's headers replace the stored ones, and the
                // freshness is computed again from the result.
                let mut headers = stale.headers.clone();
                update_headers(&mut headers, resp.headers());
                let fresh = self.ttl(&headers, pending.authorized);
                let entry = Arc::new(Entry::new(
                    stale.status,
                    headers,
                    stale.body.clone(),
                    fresh.unwrap_or((Duration::ZERO, true)),
                ));
                if fresh.is_some() {
                    self.entries.insert(pending.vary_key.clone(), entry.clone());
                } else {
                    self.entries.remove(pending.vary_key.as_str());
                }
                if let Some(l) = &pending.leader {
                    let _ = l.tx.send(Some(entry.clone()));
                }
                let mut out = serve(&entry, &pending.client, head);
                out.headers_mut()
                    .insert(X_CACHE, HeaderValue::from_static("REVALIDATED"));
                return out;
            }
        }
        let Some(((ttl, must_revalidate), vary_names)) = self.storable(&resp, pending.authorized)
        else {
            self.mark_uncacheable(pending.base_key.clone());
            if resp.status() == StatusCode::OK && pending.client.not_modified(resp.headers()) {
                // The client's validators were not sent upstream: answer them here.
                let (mut parts, _) = resp.into_parts();
                parts.status = StatusCode::NOT_MODIFIED;
                parts.headers.remove(header::CONTENT_LENGTH);
                parts.headers.remove(header::TRANSFER_ENCODING);
                return miss(Response::from_parts(parts, super::respond::empty()));
            }
            return miss(resp);
        };
        let (mut parts, body) = resp.into_parts();
        let body = match read_limited(body, self.config.max_body_bytes).await {
            Ok(body) => body,
            Err(ReadError::TooLarge { body }) => {
                self.mark_uncacheable(pending.base_key.clone());
                return miss(Response::from_parts(parts, body));
            }
            Err(ReadError::Body(e)) => {
                tracing::debug!(error = %e, "cache: upstream body failed");
                // The upstream's head promised a body it did not deliver.
                return miss(super::respond::error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream body failed",
                ));
            }
        };
        let mut headers = parts.headers.clone();
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        if !head {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let entry = Arc::new(Entry::new(
            parts.status,
            headers,
            body.clone(),
            (ttl, must_revalidate),
        ));
        let key = vary_key_with(&pending.base_key, &vary_names, &pending.request_headers);
        self.vary.insert(
            pending.base_key.clone(),
            Arc::new(KeyInfo::Vary(vary_names)),
        );
        self.entries.insert(key.clone(), entry.clone());
        // Waiters share our key only if they share our Vary'd header values.
        if let Some(l) = &pending.leader {
            if key == pending.vary_key {
                let _ = l.tx.send(Some(entry.clone()));
            }
        }
        if pending.client.not_modified(&entry.headers) {
            let mut out = serve(&entry, &pending.client, head);
            out.headers_mut()
                .insert(X_CACHE, HeaderValue::from_static("MISS"));
            return out;
        }
        parts.headers.remove(header::TRANSFER_ENCODING);
        if !head {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        miss(Response::from_parts(parts, full(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CachePolicy {
        CachePolicy::build(toml::from_str("").unwrap()).unwrap()
    }

    fn headers(cc: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CACHE_CONTROL, HeaderValue::try_from(cc).unwrap());
        h
    }

    #[test]
    fn ttl_honours_cache_control() {
        let p = policy();
        let ttl = |cc: &str| p.ttl(&headers(cc), false);
        assert_eq!(ttl("max-age=60"), Some((Duration::from_secs(60), false)));
        assert_eq!(
            ttl("max-age=60, s-maxage=5"),
            Some((Duration::from_secs(5), false))
        );
        assert_eq!(ttl("no-store, max-age=60"), None);
        // Directive names are case-insensitive; values may be quoted.
        assert_eq!(ttl("MAX-AGE=\"7\""), Some((Duration::from_secs(7), false)));
        assert_eq!(ttl("No-Store, max-age=60"), None);
        assert_eq!(ttl("private, max-age=60"), None);
        assert_eq!(p.ttl(&HeaderMap::new(), false), None);
        // Authorized requests need an explicit permission to share.
        assert_eq!(p.ttl(&headers("max-age=60"), true), None);
        assert!(p.ttl(&headers("public, max-age=60"), true).is_some());
        // An invalid delta-seconds is stale; a huge one is capped by max_ttl_secs.
        assert_eq!(ttl("max-age=abc"), None);
        assert_eq!(ttl("max-age=+5"), None);
        assert_eq!(
            ttl("max-age=99999999999999999999999"),
            Some((Duration::from_secs(86_400), false))
        );
    }

    /// An `Age` too large for a number is 2^31 seconds (RFC 9111 1.2.2), and the entry's age
    /// stays representable: a `no-cache` response with an ETag is stored however old.
    #[test]
    fn a_huge_age_is_capped_and_ages_without_overflow() {
        let mut h = headers("no-cache");
        h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        h.insert(
            header::AGE,
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(received_age(&h), Duration::from_secs(1 << 31));
        let entry = Entry::new(StatusCode::OK, h, Bytes::new(), (Duration::ZERO, true));
        assert!(entry.age() >= Duration::from_secs(1 << 31));
        assert!(!entry.fresh());
    }

    #[test]
    fn age_and_expires_bound_freshness() {
        let p = policy();
        let mut h = headers("max-age=60");
        h.insert(header::AGE, HeaderValue::from_static("59"));
        assert_eq!(received_age(&h), Duration::from_secs(59));
        assert!(p.ttl(&h, false).is_some());
        h.insert(header::AGE, HeaderValue::from_static("60"));
        assert_eq!(p.ttl(&h, false), None, "stale on arrival");

        let mut h = HeaderMap::new();
        h.insert(
            header::DATE,
            HeaderValue::from_static("Wed, 31 Dec 2098 23:59:00 GMT"),
        );
        h.insert(
            header::EXPIRES,
            HeaderValue::from_static("Thu, 01 Jan 2099 00:00:00 GMT"),
        );
        assert_eq!(p.ttl(&h, false), Some((Duration::from_secs(60), false)));
        // max-age wins over Expires.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        assert_eq!(p.ttl(&h, false), Some((Duration::from_secs(5), false)));
        let with_default =
            CachePolicy::build(toml::from_str("default_ttl_secs = 60").unwrap()).unwrap();
        for expires in ["0", "Thu, 01 Jan 1970 00:00:00 GMT", "soon"] {
            let mut h = HeaderMap::new();
            h.insert(header::EXPIRES, HeaderValue::from_static(expires));
            assert_eq!(with_default.ttl(&h, false), None, "{expires}");
        }
    }

    #[test]
    fn http_dates_parse() {
        let at = |s: &'static str| {
            http_date(&HeaderValue::from_static(s))
                .map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs())
        };
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(at("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(at("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
        // The obsolete RFC 850 and asctime formats, which recipients must accept.
        assert_eq!(at("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(at("Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(at("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(at("0"), None);
    }

    #[test]
    fn etags_compare_weakly() {
        let a = HeaderValue::from_static("\"x\", W/\"abc\"");
        assert!(etag_matches(&a, &HeaderValue::from_static("\"abc\"")));
        assert!(!etag_matches(&a, &HeaderValue::from_static("\"abd\"")));
        // Entity tags may hold commas; a list member that is no entity tag is skipped.
        let commas = HeaderValue::from_static("junk, \"a,b\" ,W/\"c, d\"");
        assert!(etag_matches(&commas, &HeaderValue::from_static("\"a,b\"")));
        assert!(etag_matches(
            &commas,
            &HeaderValue::from_static("W/\"c, d\"")
        ));
        assert!(!etag_matches(&commas, &HeaderValue::from_static("\"a\"")));
        assert!(!etag_matches(&commas, &HeaderValue::from_static("\"b\"")));
        assert!(!etag_matches(&commas, &HeaderValue::from_static("\" d\"")));
        assert!(etag_matches(
            &HeaderValue::from_static(" * "),
            &HeaderValue::from_static("\"x\"")
        ));
        assert!(!etag_matches(
            &HeaderValue::from_static("\"x"),
            &HeaderValue::from_static("\"x\"")
        ));
    }
}
