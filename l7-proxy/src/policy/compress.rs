//! Response compression (gzip, br, zstd), streamed.
//!
//! Data in: the request's `Accept-Encoding` (with q-values) picks an encoding in the request
//! phase; it travels to the response phase in [`RequestCtx::extensions`].
//!
//! Data out: a response is compressed when an encoding was negotiated, it is not already
//! encoded, its `Content-Type` starts with one of `content_types`, it has a body (not HEAD,
//! 204, 304) and its `Content-Length` is at least `min_size` (unknown length → compress). The
//! body stream is wrapped by an async-compression encoder chunk by chunk, never buffered whole;
//! `Content-Length` is removed, `Content-Encoding` set and `Vary: Accept-Encoding` added.

use std::pin::Pin;

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use super::respond::{append_token, content_length};
use super::{BoxError, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "compress", algorithms = ["zstd", "br", "gzip"], min_size = 1024 }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressConfig {
    /// Encodings offered, in server preference order (used to break q-value ties).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Encoding>,
    /// Responses with a known length below this are sent as is.
    #[serde(default = "default_min_size")]
    pub min_size: u64,
    /// Content-type prefixes worth compressing.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// Brotli quality 0-11. Quality 11 (the library default) is far too slow for streaming
    /// proxied responses; 4 compresses about as well as gzip -6 at a similar speed.
    #[serde(default = "default_brotli_quality")]
    pub brotli_quality: i32,
}

fn default_brotli_quality() -> i32 {
    4
}

fn default_algorithms() -> Vec<Encoding> {
    vec![Encoding::Zstd, Encoding::Br, Encoding::Gzip]
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
struct Negotiated {
    encoding: Encoding,
    head: bool,
}

pub struct CompressPolicy {
    config: CompressConfig,
}

impl CompressPolicy {
    pub fn build(config: CompressConfig) -> Result<Self, PolicyBuildError> {
        if !(0..=11).contains(&config.brotli_quality) {
            return Err(PolicyBuildError {
                policy: "compress".into(),
                message: "brotli_quality must be within 0..=11".into(),
            });
        }
        if config.algorithms.is_empty() {
            return Err(PolicyBuildError {
                policy: "compress".into(),
                message: "algorithms must not be empty".into(),
            });
        }
        Ok(Self { config })
    }

    fn compressible(&self, resp: &Response<ProxyBody>) -> bool {
        let status = resp.status();
        // A range names bytes of the identity encoding; re-encoding it would corrupt it.
        if status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
            || status.is_informational()
            || resp.headers().contains_key(header::CONTENT_RANGE)
        {
            return false;
        }
        let h = resp.headers();
        let encoded = h
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity");
        let no_transform = h
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("no-transform"));
        let type_ok = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| ct.trim().to_ascii_lowercase())
            .is_some_and(|ct| {
                self.config
                    .content_types
                    .iter()
                    .any(|p| ct.starts_with(p.as_str()))
            });
        let big_enough = content_length(h).is_none_or(|len| len >= self.config.min_size);
        !encoded && !no_transform && type_ok && big_enough
    }
}

/// Picks the offered encoding with the highest q-value in `accept_encoding`, ties broken by
/// `offered` order. `*` covers encodings not named; q=0 refuses.
pub fn negotiate(accept_encoding: &str, offered: &[Encoding]) -> Option<Encoding> {
    let mut star = None;
    let mut named: Vec<(String, f32)> = Vec::new();
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if coding.is_empty() {
            continue;
        }
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if coding == "*" {
            star = Some(q);
        } else {
            named.push((coding, q));
        }
    }
    let mut best: Option<(Encoding, f32)> = None;
    for &enc in offered {
        let q = named
            .iter()
            .find(|(c, _)| c == enc.token() || (enc == Encoding::Gzip && c == "x-gzip"))
            .map(|(_, q)| *q)
            .or(star)
            .unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((enc, q));
        }
    }
    best.map(|(e, _)| e)
}

/// Wraps `body` in a streaming encoder (gzip and zstd at their default levels).
pub fn encode_body(body: ProxyBody, encoding: Encoding, brotli_quality: i32) -> ProxyBody {
    let input = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let encoder: Pin<Box<dyn AsyncRead + Send>> = match encoding {
        Encoding::Gzip => Box::pin(GzipEncoder::new(input)),
        Encoding::Br => Box::pin(BrotliEncoder::with_quality(
            input,
            Level::Precise(brotli_quality),
        )),
        Encoding::Zstd => Box::pin(ZstdEncoder::new(input)),
    };
    let frames = ReaderStream::new(encoder)
        .map_ok(Frame::data)
        .map_err(|e| Box::new(e) as BoxError);
    // Encoders are Send but not Sync; the wrapper only hands out `&mut` access.
    let frames = sync_wrapper::SyncStream::new(frames.boxed());
    BodyExt::boxed(StreamBody::new(frames))
}

#[async_trait::async_trait]
impl Policy for CompressPolicy {
    fn name(&self) -> &'static str {
        "compress"
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let encoding = req
            .headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        if let Some(encoding) = negotiate(&encoding, &self.config.algorithms) {
            ctx.extensions.insert(Negotiated {
                encoding,
                head: req.method() == Method::HEAD,
            });
        }
        RequestOutcome::Continue(req)
    }

    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let Some(neg) = ctx.extensions.get::<Negotiated>().copied() else {
            return resp;
        };
        if !self.compressible(&resp) {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::ACCEPT_RANGES);
        parts.headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(neg.encoding.token()),
        );
        append_token(&mut parts.headers, header::VARY, "Accept-Encoding");
        // A strong validator names the identity bytes; the encoded ones differ.
        if let Some(etag) = parts
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
        {
            if !etag.starts_with("W/") {
                if let Ok(weak) = HeaderValue::try_from(format!("W/{etag}")) {
                    parts.headers.insert(header::ETAG, weak);
                }
            }
        }
        let body = if neg.head {
            body
        } else {
            encode_body(body, neg.encoding, self.config.brotli_quality)
        };
        Response::from_parts(parts, body)
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
    }
}
