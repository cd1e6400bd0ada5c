//! Helpers shared by the policies: building bodies and short error responses, and reading a
//! body under a size limit without losing what was read when the limit is passed.
//!
//! Policies that answer a request themselves (401, 413, 429, ...) build their responses here so
//! every gateway error has the same shape: a small JSON object `{"error": "..."}`.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Body;
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use smallvec::SmallVec;

use super::{BoxError, ProxyBody};
use crate::pipeline::headers::{has_token, list_items, value_items};

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A JSON response with `value` as body.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gateway error response: `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_response(status, &serde_json::json!({ "error": message }))
}

/// Outcome of [`read_limited`] when the whole body did not fit.
pub enum ReadError {
    /// The body is longer than the limit. `body` replays what was read followed by the rest, so
    /// the caller can still pass it on unchanged.
    TooLarge { body: ProxyBody },
    /// The body stream failed.
    Body(BoxError),
}

/// Reads `body` completely if it holds at most `limit` bytes. A body that arrives in one
/// frame is returned without copying.
pub async fn read_limited(body: ProxyBody, limit: usize) -> Result<Bytes, ReadError> {
    let mut stream = BodyStream::new(body);
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(ReadError::Body)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are dropped from buffered bodies
        };
        let len = first.as_ref().map_or(0, Bytes::len) + buf.len() + data.len();
        if first.is_none() && buf.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                buf.reserve(len.min(limit + 1));
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&data);
        }
        if len > limit {
            let read = first.take().unwrap_or_else(|| buf.split().freeze());
            let prefix = futures_util::stream::once(async move { Ok(Frame::data(read)) });
            let replay = StreamBody::new(prefix.chain(stream));
            return Err(ReadError::TooLarge {
                body: BodyExt::boxed(replay),
            });
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// The whole of `body`, whose length is `len`, if all of it has already arrived: read without
/// waiting (polled with a waker that does nothing). A small response usually comes in with its
/// head, so a policy that needs the body whole (compressing it in one call) can then finish
/// at once instead of awaiting [`read_limited`]. Otherwise `body` is left as it was: what was
/// read of it goes back in front of the rest (an error after it too), for `read_limited`.
/// Trailers are dropped, as `read_limited` drops them.
pub fn whole_body_now(body: &mut ProxyBody, len: usize) -> Option<Bytes> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut read: SmallVec<[Bytes; 2]> = SmallVec::new();
    let mut got = 0;
    let failed = loop {
        if got == len {
            // Complete: one frame as it came, several joined.
            return Some(match read.len() {
                0 => Bytes::new(),
                1 => read.pop().unwrap_or_default(),
                _ => read.concat().into(),
            });
        }
        match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    got += data.len();
                    read.push(data);
                    if got > len {
                        break None;
                    }
                }
            }
            std::task::Poll::Ready(Some(Err(e))) => break Some(e),
            // Shorter than said, or not all here yet.
            std::task::Poll::Ready(None) | std::task::Poll::Pending => break None,
        }
    };
    if !read.is_empty() || failed.is_some() {
        let rest = std::mem::replace(body, empty());
        let frames = read
            .into_iter()
            .map(|data| Ok(Frame::data(data)))
            .chain(failed.map(Err));
        let replay = futures_util::stream::iter(frames).chain(BodyStream::new(rest));
        *body = BodyExt::boxed(StreamBody::new(replay));
    }
    None
}

/// The `Content-Length` of a message, when present and valid.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    length_value(headers.get(header::CONTENT_LENGTH)?)
}

/// A `Content-Length` value, when valid.
pub fn length_value(value: &HeaderValue) -> Option<u64> {
    value.to_str().ok()?.trim().parse().ok()
}

/// `Cache-Control` directives with their optional values (quotes removed), as written.
/// Compare names with `eq_ignore_ascii_case`.
pub fn directives(headers: &http::HeaderMap) -> impl Iterator<Item = (&str, Option<&str>)> {
    list_items(headers, &header::CACHE_CONTROL).filter_map(directive)
}

/// [`directives`] of one `Cache-Control` line.
pub fn value_directives(value: &HeaderValue) -> impl Iterator<Item = (&str, Option<&str>)> {
    value_items(value).filter_map(directive)
}

/// One `Cache-Control` item as a directive and its optional value; none if empty.
fn directive(d: &str) -> Option<(&str, Option<&str>)> {
    if d.is_empty() {
        return None;
    }
    Some(match d.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
        None => (d, None),
    })
}

/// Whether `directives` include `name`.
pub fn has_directive<'a>(
    mut directives: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    name: &str,
) -> bool {
    directives.any(|(d, _)| d.eq_ignore_ascii_case(name))
}

/// Numbers below this have a shared header value ([`number_header`]).
const SHARED_NUMBERS: u64 = 1024;

/// A header value holding `n` in decimal. Values below 1024 come from a table
/// of static values built once, so the small counters most responses carry (`RateLimit-Reset`,
/// `RateLimit-Remaining` of a typical limit, `Age`, `Retry-After`) cost no allocation; a
/// larger one is formatted as usual.
pub fn number_header(n: u64) -> HeaderValue {
    static SHARED: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
        (0..SHARED_NUMBERS)
            .map(|i| HeaderValue::from_static(Box::leak(i.to_string().into_boxed_str())))
            .collect()
    });
    if n < SHARED_NUMBERS {
        SHARED[n as usize].clone()
    } else {
        HeaderValue::from(n)
    }
}

/// Appends `value` to a comma-separated header (`Vary`), unless already listed.
pub fn append_token(headers: &mut http::HeaderMap, name: header::HeaderName, value: &'static str) {
    if !has_token(headers, &name, value) {
        headers.append(name, HeaderValue::from_static(value));
    }
}

/// A `realm` from config as the quoted string of a `WWW-Authenticate` challenge: printable
/// ASCII without `"` or `\`, or an error that says what is wrong with it.
pub fn challenge_realm(realm: &str) -> Result<&str, String> {
    match realm
        .chars()
        .find(|c| !matches!(c, ' '..='~') || matches!(c, '"' | '\\'))
    {
        None => Ok(realm),
        Some(c) => Err(format!(
            "realm: {realm:?} has {c:?}; a realm is printable ASCII without quotes or backslashes"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms_are_checked() {
        assert_eq!(challenge_realm("orders api"), Ok("orders api"));
        for bad in ["say \"hi\"", "a\\b", "caf\u{e9}", "tab\there"] {
            let err = challenge_realm(bad).unwrap_err();
            assert!(err.starts_with(&format!("realm: {bad:?} has ")), "{err}");
        }
    }

    /// A body whose frames are sent by the test, as they arrive from a socket.
    fn channel_body() -> (
        tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
        ProxyBody,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (tx, BodyExt::boxed(StreamBody::new(frames)))
    }

    fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    #[tokio::test]
    async fn a_body_all_here_is_read_at_once() {
        let mut one = full("hello");
        assert_eq!(whole_body_now(&mut one, 5).as_deref(), Some(&b"hello"[..]));
        // In several frames, with trailers among them (dropped), and not yet ended: the
        // length says it is complete.
        let (tx, mut body) = channel_body();
        tx.send(data(b"hel")).unwrap();
        tx.send(Ok(Frame::trailers(http::HeaderMap::new())))
            .unwrap();
        tx.send(data(b"lo")).unwrap();
        assert_eq!(whole_body_now(&mut body, 5).as_deref(), Some(&b"hello"[..]));
    }

    #[tokio::test]
    async fn a_body_not_all_here_is_left_whole_for_read_limited() {
        // Part here, the rest later: what was read goes back in front.
        let (tx, mut body) = channel_body();
        tx.send(data(b"hel")).unwrap();
        assert_eq!(whole_body_now(&mut body, 5), None);
        tx.send(data(b"lo")).unwrap();
        drop(tx);
        let Ok(read) = read_limited(body, 5).await else {
            panic!("the body reads whole");
        };
        assert_eq!(&read[..], b"hello");

        // Longer than said: all of it stays, and read_limited finds it too large.
        let (tx, mut body) = channel_body();
        tx.send(data(b"hello!")).unwrap();
        drop(tx);
        assert_eq!(whole_body_now(&mut body, 5), None);
        let Err(ReadError::TooLarge { body }) = read_limited(body, 5).await else {
            panic!("too large");
        };
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello!");

        // Failing after a first frame: the frame, then the error.
        let (tx, mut body) = channel_body();
        tx.send(data(b"he")).unwrap();
        tx.send(Err("upstream reset".into())).unwrap();
        assert_eq!(whole_body_now(&mut body, 5), None);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"he");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "upstream reset");
    }

    #[test]
    fn number_headers_are_decimal_on_both_sides_of_the_table() {
        for n in [0, 1, 59, 1023, 1024, 86_400, u64::MAX] {
            assert_eq!(number_header(n), n.to_string().as_str(), "{n}");
        }
    }
}
