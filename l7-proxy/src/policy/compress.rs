//! Response compression (gzip, br, zstd), streamed.
//!
//! Data in: the request's `Accept-Encoding` (with q-values) picks an encoding in the request
//! phase; it travels to the response phase in the policy's [`PhaseState`] slot.
//!
//! Data out: a response is compressed when an encoding was negotiated, it is not already
//! encoded, its `Content-Type` starts with one of `content_types`, it has a body (not HEAD,
//! 204, 304) and its `Content-Length` is at least `min_size` (unknown length → compress). The
//! `Content-Encoding` is set and `Vary: Accept-Encoding` added. Like nginx's `gzip_vary`, a
//! response that would have been compressed but goes out as is because the client accepts no
//! offered encoding gets `Vary: Accept-Encoding` too, so that a cache (the `cache` policy
//! before this one included) keeps it apart from the compressed variants.
//!
//! Two paths, like nginx's sizing of zlib to the response:
//! - A body whose `Content-Length` is at most [`ONE_SHOT_MAX`] is read (it is small and its size
//!   is known) and compressed in one call by an encoder kept per thread and reset between
//!   responses (for gzip, also sized to the body: [`super::small_gzip`]), then sent with the
//!   compressed `Content-Length`. Creating a deflate or zstd state costs far more than
//!   compressing a few KiB; reusing one makes small responses cheap.
//! - Any other body is wrapped by an async-compression encoder chunk by chunk and never
//!   buffered whole; `Content-Length` is removed (the response is chunked).

use std::cell::RefCell;
use std::pin::Pin;

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use super::respond::{
    full, has_directive, length_value, read_limited, value_directives, whole_body_now, ReadError,
};
pub use super::small_gzip::Strategy as GzipStrategy;
use super::{BoxError, Decided, PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx};
use crate::pipeline::headers::value_items;

/// `{ type = "compress", algorithms = ["zstd", "gzip", "br"], min_size = 1024, gzip_level = 1 }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressConfig {
    /// Encodings offered, in server preference order (used to break q-value ties). The
    /// default prefers zstd, then gzip, then br: on the small bodies an API returns, brotli at
    /// `brotli_quality` 4 costs several times what zstd or gzip -1 cost (its encoder allocates
    /// and clears a 512 KiB hash table per response), so a client that accepts both gzip and
    /// br gets gzip. List `br` first to prefer it.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Encoding>,
    /// Responses with a known length below this are sent as is.
    #[serde(default = "default_min_size")]
    pub min_size: u64,
    /// Content-type prefixes worth compressing.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// gzip level 1-9. 1, as nginx's `gzip_comp_level` default: on typical API responses it
    /// gets most of level 6's ratio at about half the CPU.
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    /// `"default"` or `"fixed"` (with `gzip_level = 1` only): gzip with the fixed Huffman codes
    /// of RFC 1951 only, as HAProxy's libslz and Envoy's `compression_strategy: FIXED`. On
    /// small responses, where building and sending code tables is most of the work, it costs
    /// a sixth of level 1's CPU (1 KiB of JSON: about 1.2 µs instead of 7) for about 20% more
    /// bytes (see [`super::fixed_deflate`]). It applies to bodies compressed whole (a known
    /// length up to 64 KiB); longer or chunked bodies are streamed with zlib's level 1, whose
    /// per-block tables are spread over many KiB.
    #[serde(default)]
    pub gzip_strategy: GzipStrategy,
    /// Brotli quality 0-11. Quality 11 (the library default) is far too slow for streaming
    /// proxied responses; 4 compresses about as well as gzip -6 at a similar speed on large
    /// bodies. Each response gets a new encoder whose zeroed hash table dominates the cost of
    /// small bodies: about 20 µs for 1 KiB of JSON at quality 4 (gzip -1: about 7 µs; zstd 1:
    /// about 4 µs), and about 0.85 ms from quality 5, whose tables are far larger. Keep it at 4
    /// or below for dynamic responses.
    #[serde(default = "default_brotli_quality")]
    pub brotli_quality: i32,
    /// zstd level: 1-19, or negative for zstd's fast modes (the CLI's `--fast=N`), down to
    /// -131072. 1, as nginx's zstd module: on a 1 KiB JSON response it costs about 4.2 µs
    /// against 4.9 µs at 3 (zstd's own default) for the same size, and on 16 KiB 13% less CPU
    /// for 4% more bytes. -1 halves the cost again on small bodies (about 2.1 µs for 1 KiB)
    /// for about 25% more bytes.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

fn default_gzip_level() -> u32 {
    1
}
fn default_brotli_quality() -> i32 {
    4
}
fn default_zstd_level() -> i32 {
    1
}

/// Largest known-length body compressed in one call (see the module documentation).
pub const ONE_SHOT_MAX: u64 = 64 * 1024;

fn default_algorithms() -> Vec<Encoding> {
    vec![Encoding::Zstd, Encoding::Gzip, Encoding::Br]
}
fn default_min_size() -> u64 {
    1024
}
fn default_content_types() -> Vec<String> {
    [
        "text/",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
        "image/svg+xml",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gzip,
    Br,
    Zstd,
}

impl Encoding {
    /// The encoding a content-coding token names (`x-gzip` is gzip), ASCII case-insensitive.
    fn from_token(token: &[u8]) -> Option<Self> {
        [Self::Gzip, Self::Br, Self::Zstd]
            .into_iter()
            .find(|e| token.eq_ignore_ascii_case(e.token().as_bytes()))
            .or_else(|| token.eq_ignore_ascii_case(b"x-gzip").then_some(Self::Gzip))
    }

    pub fn token(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Br => "br",
            Self::Zstd => "zstd",
        }
    }
}

/// What the request phase decided for the response phase.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// `None`: the client accepts none of the offered encodings (the response still gets
    /// `Vary: Accept-Encoding` when it could have been compressed).
    encoding: Option<Encoding>,
    head: bool,
}

pub struct CompressPolicy {
    config: CompressConfig,
}

impl CompressPolicy {
    pub fn build(config: CompressConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: &str| PolicyBuildError {
            policy: "compress".into(),
            message: message.into(),
        };
        if !(0..=11).contains(&config.brotli_quality) {
            return Err(err("brotli_quality must be within 0..=11"));
        }
        if !(1..=9).contains(&config.gzip_level) {
            return Err(err("gzip_level must be within 1..=9"));
        }
        if config.gzip_strategy == GzipStrategy::Fixed && config.gzip_level != 1 {
            return Err(err(
                "gzip_strategy = \"fixed\" needs gzip_level = 1 (fixed codes save work only at the fastest level)",
            ));
        }
        if config.zstd_level == 0
            || !(zstd::zstd_safe::min_c_level()..=19).contains(&config.zstd_level)
        {
            return Err(err(
                "zstd_level must be within 1..=19, or negative (down to -131072) for zstd's fast modes",
            ));
        }
        if config.algorithms.is_empty() {
            return Err(err("algorithms must not be empty"));
        }
        if config.brotli_quality >= 5 && config.algorithms.contains(&Encoding::Br) {
            tracing::warn!(
                brotli_quality = config.brotli_quality,
                "compress: brotli quality 5 and above costs about 0.85 ms of CPU per small \
                 response (its encoder allocates and clears megabytes of tables per response); \
                 4 or below is advised for dynamic responses"
            );
        }
        Ok(Self { config })
    }

    /// Whether a response with `status` and headers `heads` should be compressed.
    fn compressible(&self, status: StatusCode, heads: &Heads) -> bool {
        // A range names bytes of the identity encoding; re-encoding it would corrupt it.
        if status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
            || status.is_informational()
            || heads.ranged
        {
            return false;
        }
        let big_enough = heads.len.is_none_or(|len| len >= self.config.min_size);
        !heads.encoded && !heads.no_transform && heads.type_ok && big_enough
    }

    /// What the response phase needs of `headers`, in one pass over them.
    fn heads(&self, headers: &http::HeaderMap) -> Heads {
        Heads::of(headers, |ct| {
            let ct = ct.trim_ascii();
            self.config
                .content_types
                .iter()
                .any(|p| starts_with_ignore_case(ct, p.as_bytes()))
        })
    }
}

/// What the response phase reads of a response's headers, found in one pass over them: a
/// lookup by name hashes the name (byte by byte, even for a standard one), and a pass over
/// the few headers of a response costs less than the eight lookups it replaces. The edits
/// ([`CompressPolicy::prepare`]) look up only what this found.
#[derive(Clone, Copy, Default)]
struct Heads {
    /// `Content-Length`, when present and valid (the first one).
    len: Option<u64>,
    /// How many `Content-Length` values there are (valid or not).
    lengths: u8,
    /// The first `Content-Type` is one of the configured compressible types.
    type_ok: bool,
    /// The first `Content-Encoding` is not `identity`.
    encoded: bool,
    /// `Content-Range` is present.
    ranged: bool,
    /// `Cache-Control` has `no-transform`.
    no_transform: bool,
    /// `Vary` lists `Accept-Encoding` already.
    varies: bool,
    /// `Accept-Ranges` is present.
    accept_ranges: bool,
    /// `ETag` is present.
    etag: bool,
}

impl Heads {
    /// `headers` read in one pass; `type_ok` judges the first `Content-Type`.
    fn of(headers: &http::HeaderMap, type_ok: impl Fn(&[u8]) -> bool) -> Self {
        let mut heads = Self::default();
        let (mut typed, mut coded) = (false, false);
        for (name, value) in headers {
            if name == header::CONTENT_LENGTH {
                if heads.lengths == 0 {
                    heads.len = length_value(value);
                }
                heads.lengths = heads.lengths.saturating_add(1);
            } else if name == header::CONTENT_TYPE {
                if !typed {
                    typed = true;
                    heads.type_ok = type_ok(value.as_bytes());
                }
            } else if name == header::CONTENT_ENCODING {
                if !coded {
                    coded = true;
                    heads.encoded = value.as_bytes() != b"identity";
                }
            } else if name == header::CONTENT_RANGE {
                heads.ranged = true;
            } else if name == header::CACHE_CONTROL {
                heads.no_transform |= has_directive(value_directives(value), "no-transform");
            } else if name == header::VARY {
                heads.varies |=
                    value_items(value).any(|t| t.eq_ignore_ascii_case("Accept-Encoding"));
            } else if name == header::ACCEPT_RANGES {
                heads.accept_ranges = true;
            } else if name == header::ETAG {
                heads.etag = true;
            }
        }
        heads
    }
}

/// Picks the offered encoding with the highest q-value in `accept_encoding`, ties broken by
/// `offered` order. `*` covers encodings not named; q=0 refuses.
pub fn negotiate(accept_encoding: &str, offered: &[Encoding]) -> Option<Encoding> {
    negotiate_values(std::iter::once(accept_encoding.as_bytes()), offered)
}

/// [`negotiate`] over several `Accept-Encoding` header values, in one pass over their bytes
/// and without allocating. The first mention of a coding counts.
fn negotiate_values<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    offered: &[Encoding],
) -> Option<Encoding> {
    // q-value in thousandths of each encoding (by `Encoding as usize`) and of `*`, when named.
    let mut named = [None::<u32>; 3];
    let mut star = None::<u32>;
    for item in values.flat_map(|v| v.split(|&b| b == b',')) {
        let mut parts = item.split(|&b| b == b';');
        let coding = parts.next().unwrap_or_default().trim_ascii();
        let slot = if coding == b"*" {
            &mut star
        } else {
            match Encoding::from_token(coding) {
                Some(e) => &mut named[e as usize],
                None => continue,
            }
        };
        if slot.is_none() {
            let q = parts
                .filter_map(|p| {
                    let p = p.trim_ascii();
                    p.strip_prefix(b"q=").or(p.strip_prefix(b"Q="))
                })
                .find_map(|q| qvalue(q.trim_ascii()))
                .unwrap_or(1000);
            *slot = Some(q);
        }
    }
    let mut best: Option<(Encoding, u32)> = None;
    for &enc in offered {
        let q = named[enc as usize].or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((enc, q));
        }
    }
    best.map(|(e, _)| e)
}

/// A q-value (RFC 9110 12.4.2: `0` to `1` with up to three decimals) in thousandths; digits
/// past the third decimal are ignored and values above 1 count as 1. `None` if it is not a
/// decimal number.
fn qvalue(q: &[u8]) -> Option<u32> {
    let (whole, fraction) = match q.iter().position(|&b| b == b'.') {
        Some(dot) => (&q[..dot], &q[dot + 1..]),
        None => (q, &[][..]),
    };
    if whole.is_empty() && fraction.is_empty()
        || !whole.iter().chain(fraction).all(u8::is_ascii_digit)
    {
        return None;
    }
    if whole.iter().any(|&d| d != b'0') {
        return Some(1000);
    }
    let thousandths = fraction
        .iter()
        .chain(b"000")
        .take(3)
        .fold(0, |n, &d| n * 10 + u32::from(d - b'0'));
    Some(thousandths)
}

/// ASCII case-insensitive `haystack.starts_with(prefix)`.
fn starts_with_ignore_case(haystack: &[u8], prefix: &[u8]) -> bool {
    haystack.len() >= prefix.len() && haystack[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Wraps `body` in a streaming encoder at `config`'s level for `encoding`.
pub fn encode_body(body: ProxyBody, encoding: Encoding, config: &CompressConfig) -> ProxyBody {
    let input = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let encoder: Pin<Box<dyn AsyncRead + Send>> = match encoding {
        Encoding::Gzip => Box::pin(GzipEncoder::with_quality(
            input,
            Level::Precise(config.gzip_level as i32),
        )),
        Encoding::Br => Box::pin(BrotliEncoder::with_quality(
            input,
            Level::Precise(config.brotli_quality),
        )),
        Encoding::Zstd => Box::pin(ZstdEncoder::with_quality(
            input,
            Level::Precise(config.zstd_level),
        )),
    };
    let frames = ReaderStream::new(encoder)
        .map_ok(Frame::data)
        .map_err(|e| Box::new(e) as BoxError);
    // Encoders are Send but not Sync; the wrapper only hands out `&mut` access.
    let frames = sync_wrapper::SyncStream::new(frames.boxed());
    BodyExt::boxed(StreamBody::new(frames))
}

thread_local! {
    /// Per-thread zstd contexts by level; a context is reset by each one-shot compression.
    static ZSTD: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(Vec::new()) };
}

/// The value for `key` in a small per-thread pool, made by `make` the first time.
pub(super) fn pooled<K: PartialEq, V>(
    pool: &mut Vec<(K, V)>,
    key: K,
    make: impl FnOnce() -> std::io::Result<V>,
) -> std::io::Result<&mut V> {
    let at = match pool.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            pool.push((key, make()?));
            pool.len() - 1
        }
    };
    Ok(&mut pool[at].1)
}

thread_local! {
    /// Per-thread output buffer of the one-shot path, reused between responses.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Compresses a whole (small) body in one call with a reused per-thread encoder, at
/// `config`'s level for `encoding`. The output is built in a reused buffer and copied out at
/// its exact size: one allocation per body.
pub fn encode_all(
    data: &[u8],
    encoding: Encoding,
    config: &CompressConfig,
) -> std::io::Result<Bytes> {
    SCRATCH.with_borrow_mut(|out| {
        out.clear();
        encode_into(data, encoding, config, out)?;
        Ok(Bytes::copy_from_slice(out))
    })
}

/// Compresses `data` into `out`, which must be empty (zstd writes from its start).
fn encode_into(
    data: &[u8],
    encoding: Encoding,
    config: &CompressConfig,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    debug_assert!(out.is_empty());
    match encoding {
        Encoding::Gzip => {
            super::small_gzip::gzip_into(data, config.gzip_level, config.gzip_strategy, out)
        }
        Encoding::Zstd => ZSTD.with_borrow_mut(|pool| {
            let level = config.zstd_level;
            let zstd = pooled(pool, level, || zstd::bulk::Compressor::new(level))?;
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            zstd.compress_to_buffer(data, out).map(drop)
        }),
        Encoding::Br => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: config.brotli_quality,
                // The smallest window that holds the whole body (10..=24).
                lgwin: (usize::BITS - data.len().leading_zeros()).clamp(10, 24) as i32,
                size_hint: data.len(),
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &data[..], out, &params).map(drop)
        }
    }
}

/// A body that fails with `error` (the client sees the response cut off, as when streaming).
fn failed_body(error: BoxError) -> ProxyBody {
    let once = futures_util::stream::once(async move { Err::<Frame<Bytes>, _>(error) });
    BodyExt::boxed(StreamBody::new(sync_wrapper::SyncStream::new(once.boxed())))
}

impl Policy for CompressPolicy {
    fn name(&self) -> &'static str {
        "compress"
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        let values = req
            .headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes);
        let encoding = negotiate_values(values, &self.config.algorithms);
        ctx.set_state(PhaseState::Compress(Negotiated {
            encoding,
            head: req.method() == Method::HEAD,
        }));
        Decided::Continue
    }

    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        let &PhaseState::Compress(neg) = ctx.state() else {
            return true;
        };
        let heads = self.heads(resp.headers());
        let compressible = self.compressible(resp.status(), &heads);
        // A body compressed whole must be here whole; one that is not yet is awaited by
        // `on_response`.
        let mut whole = None;
        if let Some(len) = self.one_shot(neg, compressible, heads.len) {
            match whole_body_now(resp.body_mut(), len) {
                Some(data) => whole = Some(data),
                None => return false,
            }
        }
        ctx.take_state();
        if !compressible {
            return true;
        }
        let (body, len) = match whole.zip(neg.encoding) {
            Some((data, encoding)) => self.encoded(&data, encoding),
            None => (self.streamed(std::mem::take(resp.body_mut()), neg), None),
        };
        *resp.body_mut() = body;
        self.prepare(resp.headers_mut(), neg.encoding, heads, len);
        true
    }

    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let PhaseState::Compress(neg) = ctx.take_state() else {
            return resp;
        };
        let heads = self.heads(resp.headers());
        let compressible = self.compressible(resp.status(), &heads);
        if !compressible {
            return resp;
        }
        let one_shot = self.one_shot(neg, compressible, heads.len);
        let (mut parts, body) = resp.into_parts();
        let (body, len) = match (neg.encoding, one_shot) {
            (Some(encoding), Some(len)) => match read_limited(body, len).await {
                Ok(data) => self.encoded(&data, encoding),
                // The upstream sent more than its Content-Length said; hyper fails such a
                // body, but stay correct anyway and stream the rest.
                Err(ReadError::TooLarge { body }) => {
                    (encode_body(body, encoding, &self.config), None)
                }
                // Nothing is sent yet: the client gets a 502 (as from cache and transform),
                // not a connection closed without a response.
                Err(ReadError::Body(e)) => {
                    tracing::debug!(error = %e, "compress: upstream body failed");
                    return super::respond::error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream body failed",
                    );
                }
            },
            _ => (self.streamed(body, neg), None),
        };
        self.prepare(&mut parts.headers, neg.encoding, heads, len);
        Response::from_parts(parts, body)
    }
}

impl CompressPolicy {
    /// The length of a body to compress whole ([`ONE_SHOT_MAX`] at most), if this one is.
    fn one_shot(&self, neg: Negotiated, compressible: bool, len: Option<u64>) -> Option<usize> {
        let len = len.filter(|&n| n <= ONE_SHOT_MAX)?;
        (compressible && neg.encoding.is_some() && !neg.head).then_some(len as usize)
    }

    /// The headers of a compressible response: `Vary: Accept-Encoding` whether or not this
    /// client gets it compressed (nginx's gzip_vary: a cache must not hand this one to a
    /// client that sent another Accept-Encoding); with an `encoding`, `Content-Encoding`, the
    /// compressed `Content-Length` of a body compressed whole (`len`) or none (hyper chunks a
    /// streamed one), no `Accept-Ranges`, and a weak ETag (a strong one names the identity
    /// bytes). Only what `heads` says is there is looked up: each lookup hashes a name.
    fn prepare(
        &self,
        headers: &mut http::HeaderMap,
        encoding: Option<Encoding>,
        heads: Heads,
        len: Option<usize>,
    ) {
        if !heads.varies {
            headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        let Some(encoding) = encoding else {
            return;
        };
        match (len, heads.lengths) {
            // The one value replaced where it is, without a lookup.
            (Some(len), 1) => {
                if let Some(value) = headers
                    .iter_mut()
                    .find_map(|(name, value)| (name == header::CONTENT_LENGTH).then_some(value))
                {
                    *value = HeaderValue::from(len);
                }
            }
            (Some(len), _) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
            (None, 0) => {}
            (None, _) => {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
        if heads.accept_ranges {
            headers.remove(header::ACCEPT_RANGES);
        }
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.token()),
        );
        if !heads.etag {
            return;
        }
        if let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
            if !etag.starts_with("W/") {
                if let Ok(weak) = HeaderValue::try_from(format!("W/{etag}")) {
                    headers.insert(header::ETAG, weak);
                }
            }
        }
    }

    /// The body of a compressible response that is not compressed whole: through a streaming
    /// encoder when an encoding was negotiated and the response has a body, else as it is.
    fn streamed(&self, body: ProxyBody, neg: Negotiated) -> ProxyBody {
        match neg.encoding {
            Some(encoding) if !neg.head => encode_body(body, encoding, &self.config),
            _ => body,
        }
    }

    /// `data` compressed whole, and its exact length for `Content-Length` (none if the
    /// encoder failed: the body then fails too).
    fn encoded(&self, data: &[u8], encoding: Encoding) -> (ProxyBody, Option<usize>) {
        match encode_all(data, encoding, &self.config) {
            Ok(encoded) => {
                let len = encoded.len();
                (full(encoded), Some(len))
            }
            Err(e) => (failed_body(Box::new(e)), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Encoding::*;

    #[test]
    fn negotiation_follows_q_values() {
        let all = [Zstd, Br, Gzip];
        assert_eq!(negotiate("gzip, br", &all), Some(Br));
        assert_eq!(negotiate("gzip;q=1, br;q=0.5", &all), Some(Gzip));
        assert_eq!(negotiate("br;q=0, gzip;q=0.1", &all), Some(Gzip));
        assert_eq!(negotiate("*;q=0.2, zstd;q=0", &all), Some(Br));
        assert_eq!(negotiate("identity", &all), None);
        assert_eq!(negotiate("", &all), None);
        assert_eq!(negotiate("gzip", &[Br]), None);
        assert_eq!(negotiate("GZIP;Q=0.5, x-gzip", &[Gzip]), Some(Gzip));
        let two = ["gzip;q=0.2", "br;q=0.8"];
        assert_eq!(
            negotiate_values(two.iter().map(|v| v.as_bytes()), &all),
            Some(Br)
        );
        // q-values: three decimals count, a bad one is skipped, above 1 is 1.
        assert_eq!(negotiate("gzip;q=0.501, br;q=0.5", &all), Some(Gzip));
        assert_eq!(negotiate("gzip;q=0.5009, br;q=0.5", &all), Some(Br));
        assert_eq!(negotiate("gzip;q=x;q=0.9, br;q=0.8", &all), Some(Gzip));
        assert_eq!(negotiate("gzip;q=2, br", &[Gzip, Br]), Some(Gzip));
        assert_eq!(negotiate("gzip;q=.2, br;q=0.1", &all), Some(Gzip));
        assert_eq!(negotiate("gzip;q=0.000, br;q=0.001", &[Gzip]), None);
        assert_eq!(negotiate("br;q=1.0, gzip;q=0.", &all), Some(Br));
        // The default order: zstd, then gzip, then br (what Safari and Chrome send).
        assert_eq!(
            negotiate("gzip, deflate, br", &default_algorithms()),
            Some(Gzip)
        );
        assert_eq!(
            negotiate("gzip, deflate, br, zstd", &default_algorithms()),
            Some(Zstd)
        );
        assert_eq!(negotiate("br", &default_algorithms()), Some(Br));
        // The first mention counts.
        assert_eq!(negotiate("gzip;q=0, gzip", &[Gzip]), None);
        assert_eq!(negotiate("*, br;q=0", &all), Some(Zstd));
    }

    #[test]
    fn no_transform_is_a_cache_control_directive() {
        let policy = CompressPolicy::build(toml::from_str("min_size = 0").unwrap()).unwrap();
        let resp = |cc: &str| {
            let mut resp = Response::new(crate::policy::respond::empty());
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
            if !cc.is_empty() {
                h.insert(header::CACHE_CONTROL, HeaderValue::try_from(cc).unwrap());
            }
            policy.compressible(resp.status(), &policy.heads(resp.headers()))
        };
        assert!(resp(""));
        assert!(resp("max-age=60"));
        assert!(!resp("No-Transform"));
        assert!(!resp("public, no-transform, max-age=5"));
        assert!(!resp("public, no-transform=x"));
    }

    /// The header changes, each made only where the one pass found it needed.
    #[test]
    fn compressed_headers_are_edited_in_place() {
        let policy = CompressPolicy::build(toml::from_str("min_size = 0").unwrap()).unwrap();
        let edit = |pairs: &[(&str, &str)], encoding: Option<Encoding>, len: Option<usize>| {
            let mut headers = http::HeaderMap::new();
            for (name, value) in pairs {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let heads = policy.heads(&headers);
            assert_eq!(
                heads.len,
                pairs
                    .iter()
                    .find(|p| p.0 == "content-length")
                    .and_then(|p| p.1.parse().ok())
            );
            policy.prepare(&mut headers, encoding, heads, len);
            let mut out: Vec<String> = headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            out.sort();
            out
        };
        let base = [
            ("content-type", "application/json"),
            ("content-length", "925"),
            ("accept-ranges", "bytes"),
            ("etag", "\"v1\""),
        ];
        assert_eq!(
            edit(&base, Some(Encoding::Gzip), Some(480)),
            [
                "content-encoding: gzip",
                "content-length: 480",
                "content-type: application/json",
                "etag: W/\"v1\"",
                "vary: Accept-Encoding",
            ]
        );
        // Streamed: no length; not encoded: only Vary, not twice.
        assert_eq!(
            edit(&base[..2], Some(Encoding::Zstd), None),
            [
                "content-encoding: zstd",
                "content-type: application/json",
                "vary: Accept-Encoding",
            ]
        );
        assert_eq!(
            edit(
                &[("content-length", "9"), ("vary", "origin, accept-encoding")],
                None,
                None
            ),
            ["content-length: 9", "vary: origin, accept-encoding"]
        );
        // Two lengths (as an upstream may send them) become the one true length.
        assert_eq!(
            edit(
                &[("content-length", "9"), ("content-length", "9")],
                Some(Encoding::Br),
                Some(5)
            ),
            [
                "content-encoding: br",
                "content-length: 5",
                "vary: Accept-Encoding",
            ]
        );
    }

    const ZSTD_RANGE: &str =
        "zstd_level must be within 1..=19, or negative (down to -131072) for zstd's fast modes";

    #[test]
    fn levels_out_of_range_are_rejected() {
        for (field, message) in [
            ("gzip_level = 0", "gzip_level must be within 1..=9"),
            ("gzip_level = 10", "gzip_level must be within 1..=9"),
            ("zstd_level = 20", ZSTD_RANGE),
            ("zstd_level = 0", ZSTD_RANGE),
            ("zstd_level = -131073", ZSTD_RANGE),
            (
                "brotli_quality = 12",
                "brotli_quality must be within 0..=11",
            ),
            (
                "gzip_level = 6\ngzip_strategy = \"fixed\"",
                "gzip_strategy = \"fixed\" needs gzip_level = 1 (fixed codes save work only at the fastest level)",
            ),
        ] {
            let config: CompressConfig = toml::from_str(field).unwrap();
            let err = CompressPolicy::build(config).err().expect(field);
            assert_eq!(err.message, message);
        }
        for ok in [
            "gzip_level = 9\nzstd_level = 19",
            "zstd_level = -5",
            "gzip_strategy = \"fixed\"",
            "gzip_level = 1\ngzip_strategy = \"default\"",
        ] {
            let ok: CompressConfig = toml::from_str(ok).unwrap();
            assert!(CompressPolicy::build(ok).is_ok());
        }
    }

    #[test]
    fn one_shot_output_decodes_for_each_encoding() {
        use std::io::Read;
        let data: Vec<u8> = (0..5000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for config in [
            "gzip_level = 6\nbrotli_quality = 4\nzstd_level = 3",
            "zstd_level = -5",
            // Twice: the second call reuses each thread's encoders.
            "zstd_level = -5",
            "gzip_strategy = \"fixed\"",
        ] {
            let config: CompressConfig = toml::from_str(config).unwrap();
            let gz = encode_all(&data, Gzip, &config).unwrap();
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data);
            let zs = encode_all(&data, Zstd, &config).unwrap();
            assert_eq!(zstd::stream::decode_all(&zs[..]).unwrap(), data);
            let br = encode_all(&data, Br, &config).unwrap();
            let mut out = Vec::new();
            brotli::Decompressor::new(&br[..], 4096)
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data);
        }
    }

    /// A body that is all there when the response comes is compressed at once
    /// (`try_response`); one that comes later is awaited (`on_response`), in one frame or
    /// several. Both give the same whole-body gzip with its `Content-Length`.
    #[tokio::test]
    async fn a_body_that_comes_after_its_head_is_awaited_and_compressed_whole() {
        use std::io::Read;
        let table: toml::Table =
            toml::from_str(r#"p = [{ type = "compress", algorithms = ["gzip"] }]"#).unwrap();
        let configs: Vec<super::super::PolicyConfig> = table["p"].clone().try_into().unwrap();
        let chain = super::super::build_chain(&configs).unwrap();
        let data: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{},", i % 97).into_bytes())
            .collect();
        for late_frames in [0, 1, 3] {
            let req = Request::get("/x")
                .header(header::ACCEPT_ENCODING, "gzip")
                .body(super::super::respond::empty())
                .unwrap();
            let mut ctx = RequestCtx::new(
                "192.0.2.1:1".parse().unwrap(),
                String::new(),
                "r".into(),
                "g".into(),
                false,
                std::time::Instant::now(),
            );
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, BoxError>>();
            let chunks: Vec<Bytes> = if late_frames == 0 {
                vec![Bytes::from(data.clone())]
            } else {
                data.chunks(data.len().div_ceil(late_frames))
                    .map(Bytes::copy_from_slice)
                    .collect()
            };
            if late_frames == 0 {
                tx.send(Ok(Frame::data(chunks[0].clone()))).unwrap();
            } else {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for chunk in chunks {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        tx.send(Ok(Frame::data(chunk))).unwrap();
                    }
                });
            }
            drop(tx);
            let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let body = BodyExt::boxed(StreamBody::new(frames));
            let len = data.len();
            let resp = chain
                .handle(req, &mut ctx, |_, _| async move {
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/plain")
                        .header(header::CONTENT_LENGTH, len)
                        .body(body)
                        .unwrap()
                })
                .await;
            assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
            // Compressed whole: a body of known length, which hyper sends with it.
            let exact = http_body::Body::size_hint(resp.body()).exact();
            let gz = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(exact, Some(gz.len() as u64), "{late_frames} late frames");
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == data, "{late_frames} late frames");
        }
    }
}
