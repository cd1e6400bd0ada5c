//! A look at the raw HTTP/1 request heads, before hyper normalises them.
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` the
//! way RFC 9112 allows (chunked wins, the length header is dropped) and folds equal duplicate
//! `Content-Length`s into one, so the pipeline cannot see those smuggling markers in the
//! parsed headers. This wrapper follows the byte stream of an HTTP/1 connection — heads,
//! fixed-length bodies, chunked bodies — parses each head with `httparse`, and queues one
//! [`FramingVerdict`] per request in order. A head that arrives in one read is parsed where it
//! lies, without copying; only heads split over reads are collected first. The sanitize phase pops the verdict for its
//! request and answers `400` to an ambiguous one, which is therefore never forwarded.
//!
//! Whenever the stream stops being plain HTTP/1 requests (an HTTP/2 preface, an upgrade or
//! `CONNECT`, a head it cannot parse, a head larger than [`MAX_HEAD`]), the guard stops
//! looking and queues nothing more; hyper and the header checks still apply.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Largest request head inspected.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Whether a request's raw framing headers were unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingVerdict {
    Ok,
    /// Why the request must be refused.
    Reject(&'static str),
}

/// Verdicts of one connection, in request order.
#[derive(Debug, Default)]
pub struct FramingVerdicts(Mutex<VecDeque<FramingVerdict>>);

impl FramingVerdicts {
    /// The verdict of the next request (`None` once the guard stopped looking).
    pub fn next(&self) -> Option<FramingVerdict> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    fn push(&self, verdict: FramingVerdict) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(verdict);
    }
}

#[derive(Debug)]
enum State {
    Head,
    FixedBody(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
    /// A head over [`MAX_HEAD`]: no longer parsed, only followed to its end (an empty line),
    /// so that the head timer runs until then; the guard stops there. Holds the last three
    /// bytes seen.
    LongHead([u8; 3]),
    Stopped,
}

/// Wraps a client stream and inspects what is read from it.
pub struct FramingGuard<S> {
    inner: S,
    state: State,
    /// The head or line being collected.
    pending: Vec<u8>,
    verdicts: Arc<FramingVerdicts>,
    started: bool,
    /// How long a request head may take from its first byte to its end.
    head_timeout: Option<Duration>,
    /// Running while a head has begun but not ended.
    head_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> FramingGuard<S> {
    /// `head_timeout`: a request head must end within this time of its first byte, or reads
    /// fail with `TimedOut` (hyper then closes the connection). hyper's own header read
    /// timeout also runs while a keep-alive connection waits for its next request, which
    /// made it the keep-alive timeout; here the wait before the first byte is idle time,
    /// bounded by the idle timeout, as in Envoy and Go.
    pub fn new(inner: S, head_timeout: Option<Duration>) -> (Self, Arc<FramingVerdicts>) {
        let verdicts = Arc::new(FramingVerdicts::default());
        (
            Self {
                inner,
                state: State::Head,
                pending: Vec::new(),
                verdicts: verdicts.clone(),
                started: false,
                head_timeout,
                head_deadline: None,
            },
            verdicts,
        )
    }

    /// A head has begun and not ended.
    fn in_head(&self) -> bool {
        matches!(self.state, State::Head) && !self.pending.is_empty()
            || matches!(self.state, State::LongHead(_))
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            if bytes.starts_with(b"PRI ") {
                self.state = State::Stopped;
            }
        }
        while !bytes.is_empty() {
            match self.state {
                State::Stopped => return,
                State::LongHead(last) => {
                    // `last` ends the previous read: a head's end may straddle two reads.
                    // (Only heads over MAX_HEAD come here, so the copy is rare.)
                    let mut seen = last.to_vec();
                    seen.extend_from_slice(bytes);
                    self.state = if find_blank_line(&seen) {
                        State::Stopped
                    } else {
                        State::LongHead(seen[seen.len() - 3..].try_into().unwrap_or_default())
                    };
                    return;
                }
                State::Head => {
                    if self.pending.is_empty() {
                        // hyper ignores empty lines before a request line.
                        let skip = bytes
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                        // Common case: the whole head came in one read. Parse it in place.
                        match self.parse_head(bytes) {
                            Some(head_len) => bytes = &bytes[head_len..],
                            None => {
                                self.pending.extend_from_slice(bytes);
                                self.stop_if_too_long();
                                return;
                            }
                        }
                    } else {
                        // A head split over reads: parse again only once a blank line may
                        // have arrived, so a head sent byte by byte costs linear time.
                        let before = self.pending.len();
                        self.pending.extend_from_slice(bytes);
                        let may_end = find_blank_line(&self.pending[before.saturating_sub(3)..]);
                        let pending = std::mem::take(&mut self.pending);
                        match may_end.then(|| self.parse_head(&pending)).flatten() {
                            Some(head_len) => {
                                bytes = &bytes[head_len.saturating_sub(before).min(bytes.len())..];
                            }
                            None => {
                                self.pending = pending;
                                self.stop_if_too_long();
                                return;
                            }
                        }
                    }
                }
                State::FixedBody(remaining) => {
                    let n = remaining.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if remaining == n {
                        State::Head
                    } else {
                        State::FixedBody(remaining - n)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                        self.pending.extend_from_slice(bytes);
                        if self.pending.len() > MAX_HEAD {
                            self.stop();
                        }
                        return;
                    };
                    self.pending.extend_from_slice(&bytes[..=nl]);
                    bytes = &bytes[nl + 1..];
                    let line = std::mem::take(&mut self.pending);
                    self.on_line(&line);
                }
                State::ChunkData(remaining) => {
                    let n = remaining.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if remaining == n {
                        State::ChunkDataEnd(2)
                    } else {
                        State::ChunkData(remaining - n)
                    };
                }
                State::ChunkDataEnd(left) => {
                    let n = (left as usize).min(bytes.len());
                    bytes = &bytes[n..];
                    self.state = if left as usize == n {
                        State::ChunkSize
                    } else {
                        State::ChunkDataEnd(left - n as u8)
                    };
                }
            }
        }
    }

    fn stop_if_too_long(&mut self) {
        if self.pending.len() > MAX_HEAD {
            let tail = self.pending[self.pending.len() - 3..]
                .try_into()
                .unwrap_or_default();
            self.pending = Vec::new();
            self.state = State::LongHead(tail);
        }
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.pending = Vec::new();
    }

    fn on_line(&mut self, line: &[u8]) {
        let text = trim_crlf(line);
        match self.state {
            State::ChunkSize => {
                let size = std::str::from_utf8(text).ok().and_then(|t| {
                    u64::from_str_radix(t.split(';').next().unwrap_or("").trim(), 16).ok()
                });
                self.state = match size {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    None => State::Stopped,
                };
            }
            State::Trailers if text.is_empty() => self.state = State::Head,
            _ => {}
        }
    }

    /// Parses the head at the start of `buf` and queues its verdict. `None` when the head is
    /// not complete yet; otherwise how many bytes it took (after a parse error the guard
    /// stops, and the number does not matter).
    fn parse_head(&mut self, buf: &[u8]) -> Option<usize> {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.stop();
                return Some(buf.len());
            }
        };
        let (mut cl_count, mut te_count) = (0usize, 0usize);
        let (mut cl, mut te): (Option<&[u8]>, Option<&[u8]>) = (None, None);
        let (mut upgrade, mut connection_upgrade) = (false, false);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl_count += 1;
                cl.get_or_insert(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te_count += 1;
                te.get_or_insert(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection_upgrade |= h
                    .value
                    .split(|b| *b == b',')
                    .any(|t| trim_crlf(t).eq_ignore_ascii_case(b"upgrade"));
            }
        }
        let verdict = if cl_count > 0 && te_count > 0 {
            FramingVerdict::Reject("both Content-Length and Transfer-Encoding")
        } else if cl_count > 1 {
            FramingVerdict::Reject("repeated Content-Length")
        } else if te_count > 1 {
            FramingVerdict::Reject("repeated Transfer-Encoding")
        } else {
            FramingVerdict::Ok
        };
        self.verdicts.push(verdict);
        if req.method == Some("CONNECT")
            || (upgrade && connection_upgrade)
            || verdict != FramingVerdict::Ok
        {
            self.stop();
            return Some(head_len);
        }
        self.state = if let Some(te) = te {
            if trim_crlf(te).eq_ignore_ascii_case(b"chunked") {
                State::ChunkSize
            } else {
                State::Stopped
            }
        } else if let Some(cl) = cl {
            match std::str::from_utf8(cl)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                Some(0) => State::Head,
                Some(n) => State::FixedBody(n),
                None => State::Stopped,
            }
        } else {
            State::Head
        };
        Some(head_len)
    }
}

fn trim_crlf(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n' | b' ' | b'\t'] = s {
        s = rest;
    }
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

/// Whether `bytes` holds the end of a head: an empty line (`\n\n` or `\n\r\n`).
fn find_blank_line(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match result {
            Poll::Ready(Ok(())) if !matches!(this.state, State::Stopped) => {
                this.feed(&buf.filled()[before..]);
                match this.head_timeout {
                    Some(limit) if this.in_head() => {
                        if this.head_deadline.is_none() {
                            this.head_deadline = Some(Box::pin(tokio::time::sleep(limit)));
                        }
                    }
                    _ => this.head_deadline = None,
                }
            }
            Poll::Pending => {
                if let Some(deadline) = &mut this.head_deadline {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not complete in time",
                        )));
                    }
                }
            }
            _ => {}
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], chunk: usize) -> Vec<Option<FramingVerdict>> {
        let (mut guard, verdicts) = FramingGuard::new((), None);
        for piece in stream.chunks(chunk) {
            guard.feed(piece);
        }
        (0..4).map(|_| verdicts.next()).collect()
    }

    const PIPELINE: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\n\r\n\
Content-Length: 1\r\n\r\nGET / HTT\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
\r\nGET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn follows_bodies_and_flags_only_the_ambiguous_head() {
        for chunk in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                verdicts(PIPELINE, chunk),
                vec![
                    Some(FramingVerdict::Ok),
                    Some(FramingVerdict::Ok),
                    Some(FramingVerdict::Reject(
                        "both Content-Length and Transfer-Encoding"
                    )),
                    None
                ],
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn stops_at_h2_and_upgrades() {
        assert_eq!(verdicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 5)[0], None);
        let up = b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(verdicts(up, 9)[..2], [Some(FramingVerdict::Ok), None]);
    }

    /// A head too long to parse is still followed to its end, so that its timer runs until
    /// then; the guard stops after it.
    #[test]
    fn a_head_too_long_to_parse_is_followed_to_its_end() {
        let (mut guard, _) = FramingGuard::new((), None);
        let mut head = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        guard.feed(&head);
        assert!(guard.in_head());
        guard.feed(b"\r\n\r");
        assert!(guard.in_head());
        guard.feed(b"\nGET / HTTP/1.1\r\n");
        assert!(!guard.in_head());
        assert!(matches!(guard.state, State::Stopped));
    }

    #[test]
    fn repeated_lengths_are_flagged() {
        let v = verdicts(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            4,
        );
        assert_eq!(
            v[0],
            Some(FramingVerdict::Reject("repeated Content-Length"))
        );
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet: &[u8] =
            b"\r\n:; 0123456789abcdefGETPOSTHTTP/1.1Content-LengthTransfer-Encodingchunked\x00\xff";
        for _ in 0..2000 {
            let len = rng.usize(0..400);
            let mut stream: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            if rng.bool() {
                let mut prefixed = PIPELINE.to_vec();
                prefixed.append(&mut stream);
                stream = prefixed;
            }
            let _ = verdicts(&stream, rng.usize(1..50));
        }
    }
}
