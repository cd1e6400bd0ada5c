//! A look at the raw HTTP/1 request heads, before hyper normalises them.
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` the
//! way RFC 9112 allows (chunked wins, the length header is dropped) and folds equal duplicate
//! `Content-Length`s into one, so the pipeline cannot see those smuggling markers in the
//! parsed headers. This wrapper follows the byte stream of an HTTP/1 connection — heads,
//! fixed-length bodies, chunked bodies — parses each head with `httparse`, and queues one
//! [`FramingVerdict`] per request in order. The sanitize phase pops the verdict for its
//! request and answers `400` to an ambiguous one, which is therefore never forwarded.
//!
//! Whenever the stream stops being plain HTTP/1 requests (an HTTP/2 preface, an upgrade or
//! `CONNECT`, a head it cannot parse, a head larger than [`MAX_HEAD`]), the guard stops
//! looking and queues nothing more; hyper and the header checks still apply.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
}

impl<S> FramingGuard<S> {
    pub fn new(inner: S) -> (Self, Arc<FramingVerdicts>) {
        let verdicts = Arc::new(FramingVerdicts::default());
        (
            Self {
                inner,
                state: State::Head,
                pending: Vec::new(),
                verdicts: verdicts.clone(),
                started: false,
            },
            verdicts,
        )
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
                    }
                    let search_from = self.pending.len().saturating_sub(3);
                    self.pending.extend_from_slice(bytes);
                    let Some(end) = find(&self.pending[search_from..], b"\r\n\r\n") else {
                        if self.pending.len() > MAX_HEAD {
                            self.stop();
                        }
                        return;
                    };
                    let head_len = search_from + end + 4;
                    let consumed_now = bytes.len() - (self.pending.len() - head_len);
                    bytes = &bytes[consumed_now..];
                    let head = std::mem::take(&mut self.pending);
                    self.on_head(&head[..head_len]);
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

    fn on_head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return self.stop(),
        }
        let (mut cl, mut te) = (Vec::new(), Vec::new());
        let (mut upgrade, mut connection_upgrade) = (false, false);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te.push(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection_upgrade |= String::from_utf8_lossy(h.value)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
            }
        }
        let verdict = if !cl.is_empty() && !te.is_empty() {
            FramingVerdict::Reject("both Content-Length and Transfer-Encoding")
        } else if cl.len() > 1 {
            FramingVerdict::Reject("repeated Content-Length")
        } else if te.len() > 1 {
            FramingVerdict::Reject("repeated Transfer-Encoding")
        } else {
            FramingVerdict::Ok
        };
        self.verdicts.push(verdict);
        if req.method == Some("CONNECT")
            || (upgrade && connection_upgrade)
            || verdict != FramingVerdict::Ok
        {
            return self.stop();
        }
        self.state = if let Some(te) = te.first() {
            if trim_crlf(te).eq_ignore_ascii_case(b"chunked") {
                State::ChunkSize
            } else {
                State::Stopped
            }
        } else if let Some(cl) = cl.first() {
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
        if let Poll::Ready(Ok(())) = result {
            if !matches!(this.state, State::Stopped) {
                let new = buf.filled()[before..].to_vec();
                this.feed(&new);
            }
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
        let (mut guard, verdicts) = FramingGuard::new(());
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
}
