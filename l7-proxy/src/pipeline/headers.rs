//! Header handling at the proxy boundary: framing checks against request smuggling,
//! expectations (`Expect`), hop-by-hop removal, the forwarding headers (`X-Forwarded-For`,
//! `X-Forwarded-Proto`, `Forwarded`) and `X-Request-Id`. `Via` has a module of its own,
//! [`super::via`].

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection and must not be forwarded (RFC 9110 7.6.1). Names,
/// not strings: removing by `&str` parses the name again on every call.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Rejects requests whose body framing is ambiguous, which different servers could read
/// differently (request smuggling). hyper already refuses malformed heads, differing
/// duplicate `Content-Length`s and a final encoding other than chunked; this also refuses
/// what hyper accepts but an upstream might not: both `Content-Length` and
/// `Transfer-Encoding`, any `Transfer-Encoding` other than a single `chunked`, and
/// repeated `Content-Length` headers.
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if te.len() > 1
        || te
            .first()
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        return Err("unsupported Transfer-Encoding");
    }
    if cl.len() > 1 {
        return Err("repeated Content-Length");
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err("repeated Host");
    }
    if cl
        .first()
        .is_some_and(|v| v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Err("invalid Content-Length");
    }
    Ok(())
}

/// RFC 9112 3.2: an HTTP/1.1 request must carry `Host` (unless its target names the
/// authority), and a `Host` must be a host with an optional port (empty is allowed, for a
/// target without authority). A server must answer 400 otherwise, as nginx does: such a
/// request would reach routing and the upstream with a host nothing agreed on.
pub fn check_host(
    version: http::Version,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<(), &'static str> {
    match headers.get(header::HOST) {
        None if version == http::Version::HTTP_11 && uri.authority().is_none() => {
            Err("missing Host")
        }
        None => Ok(()),
        Some(host) if host.is_empty() || is_host_port(host.as_bytes()) => Ok(()),
        Some(_) => Err("invalid Host"),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 3.2.2): a bracketed IP literal, or a name (or IPv4
/// address) of unreserved, percent and sub-delimiter characters; the port up to 5 digits.
/// Checked by hand on every request: parsing an `Authority` would copy the value.
fn is_host_port(value: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &literal[..end];
        (
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')),
            &literal[end + 1..],
        )
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let name = &value[..end];
        (
            !name.is_empty()
                && name.iter().all(|&b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'-' | b'.'
                                | b'_'
                                | b'~'
                                | b'%'
                                | b'!'
                                | b'$'
                                | b'&'
                                | b'\''
                                | b'('
                                | b')'
                                | b'*'
                                | b'+'
                                | b','
                                | b';'
                                | b'='
                        )
                }),
            &value[end..],
        )
    };
    host_ok
        && match rest.split_first() {
            None => true,
            Some((b':', port)) => port.len() <= 5 && port.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// Whether the request's `Expect` holds an expectation other than `100-continue` (RFC 9110
/// 10.1.1, case-insensitive), which no part of this proxy can meet: such a request is answered
/// `417` and goes no further. `100-continue` is met by hyper, which sends `100 Continue` when
/// the body is first read (once the request is on its way to a member), and goes upstream
/// with the request as received. A line that is not text counts as unknown; empty list
/// members are ignored (RFC 9110 5.6.1).
pub fn has_unmet_expectation(headers: &HeaderMap) -> bool {
    headers.get_all(header::EXPECT).iter().any(|line| {
        let Ok(text) = line.to_str() else {
            return true;
        };
        text.split(',')
            .map(str::trim)
            .any(|member| !member.is_empty() && !member.eq_ignore_ascii_case("100-continue"))
    })
}

/// Normalises a request path so that routing and the upstream see the same path:
/// percent-encoded unreserved characters are decoded (RFC 3986 6.2.2.2: `/%61dmin` is
/// `/admin`, and must not slip past an `/admin` route), then `.` and `..` segments are
/// removed (RFC 3986 5.2.4: `/api/../admin` must not match a `/api` route and then reach
/// `/admin`) and repeated slashes merged (`//admin` is `/admin` to most servers, as to
/// nginx). Percent-encoded dot segments (`%2e%2e`) are refused, since upstreams disagree
/// on whether to decode them; reserved characters (`%2F`, ...) stay encoded. `Ok(None)`
/// means the path is already normal.
pub fn normalize_path(path: &str) -> Result<Option<String>, &'static str> {
    if path == "*" {
        return Ok(None);
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("request path must start with /");
    };
    // Without a `.` there is no dot segment, without a `%` no encoded character, and
    // without `//` no empty segment.
    if !path.bytes().any(|b| b == b'.' || b == b'%') && !path.contains("//") {
        return Ok(None);
    }
    for segment in rest.split('/') {
        if segment.len() >= 3 && segment.len() <= 6 {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            if decoded.len() < segment.len() && (decoded == "." || decoded == "..") {
                return Err("percent-encoded dot segment in path");
            }
        }
    }
    let decoded = decode_unreserved(rest);
    let rest = decoded.as_deref().unwrap_or(rest);
    let segments: Vec<&str> = rest.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut changed = decoded.is_some();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." | ".." => {
                changed = true;
                if *segment == ".." {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            // Repeated slashes are one (the trailing slash stays).
            "" if !last => changed = true,
            other => out.push(other),
        }
    }
    Ok(changed.then(|| format!("/{}", out.join("/"))))
}

/// `text` with every percent-encoded unreserved character (`A-Z a-z 0-9 - . _ ~`) decoded;
/// `None` when there is none.
fn decode_unreserved(text: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = text.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.get_or_insert_with(|| bytes[..i].to_vec()).push(c);
                    i += 3;
                    continue;
                }
            }
        }
        if let Some(out) = out.as_mut() {
            out.push(bytes[i]);
        }
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    out.map(|o| String::from_utf8_lossy(&o).into_owned())
}

/// The `Upgrade` protocol of an HTTP/1.1 upgrade request (WebSocket), if any.
///
/// `h2c` is never tunnelled (the request goes on as a plain one, its `Upgrade` removed with
/// the other hop-by-hop headers, as Envoy does): once upgraded, the client would speak HTTP/2
/// straight to the upstream and send any request it likes on that connection, past this
/// proxy's routes and policies ("h2c smuggling"). RFC 9113 has dropped the upgrade anyway.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return None;
    }
    let upgrade = headers.get(header::UPGRADE)?;
    // A value that is not text could hide `h2c`: not tunnelled either.
    let h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.to_str().is_err())
        || has_token(headers, &header::UPGRADE, "h2c");
    (!h2c).then(|| upgrade.clone())
}

/// The items of a comma-separated list header (RFC 9110 5.6.1) over all its lines, trimmed;
/// lines that are not text are skipped.
pub fn list_items<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(name).into_iter().flat_map(value_items)
}

/// The items of one line of a list header, trimmed (none if the line is not text).
pub fn value_items(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether list header `name` has the item `token` (ASCII case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    list_items(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether the request's `TE` accepts trailers (`TE: trailers`, as gRPC clients send). `TE`
/// is hop-by-hop; the proxy, which passes trailers through, says the same to an HTTP/2
/// upstream.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    list_items(headers, &header::TE).any(|t| {
        t.split(';')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
    })
}

/// Removes hop-by-hop headers, including any named in `Connection`, except `Host`: it is
/// never connection-specific, and without it the upstream would see the member's address
/// instead of the host the request was routed by.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their names instead of a lookup per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = list_items(headers, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Joins the `cookie` fields of an HTTP/2 request into one header with `"; "`, as RFC 9113
/// 8.2.3 requires before the request goes on over HTTP/1.1: HTTP/2 clients send each cookie
/// as its own field, and HTTP/1.1 servers expect one `Cookie` header.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

/// Keeps the client's `X-Request-Id` if it is sane, else generates a UUID v4.
///
/// The id only correlates log lines; it is not a secret, so it comes from the thread-local
/// fast generator rather than a `getrandom` system call per request.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 {
            return id.to_string();
        }
    }
    let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid.hyphenated().encode_lower(&mut text);
    if let Some(v) = header_value(id.to_string()) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    id.to_string()
}

/// A header value from built text, if valid; the bytes move into the value without a copy.
fn header_value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

/// All non-empty values of `name`, joined with `, ` (empty when there are none).
fn joined_values(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut joined = String::new();
    for value in headers.get_all(name) {
        let Ok(text) = value.to_str() else { continue };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(text);
    }
    joined
}

/// The forwarding header values of one client connection, built when it is accepted: the
/// client's address and the protocol do not change between its requests, and the host seldom
/// does. A request that brings no `X-Forwarded-For` or `Forwarded` of its own (the usual case
/// at the edge) then gets ready values instead of text built and checked per request.
#[derive(Debug)]
pub struct ForwardingValues {
    /// The client's address, as `X-Forwarded-For` has it.
    ip: String,
    /// `ip` as a header value: the whole `X-Forwarded-For` of a request without one.
    xff: Option<HeaderValue>,
    /// `for=<ip>;proto=<proto>`: `Forwarded` without the host.
    forwarded_for: String,
    proto: &'static str,
    /// The last host's whole `Forwarded` value.
    last: std::sync::Mutex<Option<(String, HeaderValue)>>,
}

impl ForwardingValues {
    pub fn new(client: SocketAddr, tls: bool) -> Self {
        let proto = if tls { "https" } else { "http" };
        let ip = client.ip().to_string();
        let forwarded_for = match client.ip() {
            IpAddr::V4(_) => format!("for={ip};proto={proto}"),
            IpAddr::V6(_) => format!("for=\"[{ip}]\";proto={proto}"),
        };
        Self {
            xff: HeaderValue::from_str(&ip).ok(),
            ip,
            forwarded_for,
            proto,
            last: std::sync::Mutex::new(None),
        }
    }

    /// `Forwarded` for a request to `host` that came without one.
    fn forwarded(&self, host: &str) -> Option<HeaderValue> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((h, v)) = last.as_ref() {
            if h == host {
                return Some(v.clone());
            }
        }
        let mut text = String::with_capacity(self.forwarded_for.len() + host.len() + 8);
        text.push_str(&self.forwarded_for);
        push_forwarded_host(&mut text, host);
        let value = header_value(text)?;
        *last = Some((host.to_string(), value.clone()));
        Some(value)
    }
}

/// `;host="<host>"`, when the host can be written as a quoted string.
fn push_forwarded_host(text: &mut String, host: &str) {
    if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        text.push_str(";host=\"");
        text.push_str(host);
        text.push('"');
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`.
pub fn add_forwarding_headers(headers: &mut HeaderMap, client: &ForwardingValues, host: &str) {
    // Every earlier line counts, in order: a proxy in front may have added its own line
    // after the client's (RFC 9110 5.3: repeated lines are one comma-separated list).
    let xff = match headers.get(&X_FORWARDED_FOR) {
        None => client.xff.clone(),
        Some(_) => {
            let mut xff = joined_values(headers, &X_FORWARDED_FOR);
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            xff.push_str(&client.ip);
            headers.remove(&X_FORWARDED_FOR);
            header_value(xff)
        }
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(client.proto),
    );

    let forwarded = match headers.get(header::FORWARDED) {
        None => client.forwarded(host),
        Some(_) => {
            let previous = joined_values(headers, &header::FORWARDED);
            let mut forwarded = String::with_capacity(
                previous.len() + client.forwarded_for.len() + host.len() + 12,
            );
            if !previous.is_empty() {
                forwarded.push_str(&previous);
                forwarded.push_str(", ");
            }
            forwarded.push_str(&client.forwarded_for);
            push_forwarded_host(&mut forwarded, host);
            headers.remove(header::FORWARDED);
            header_value(forwarded)
        }
    };
    if let Some(v) = forwarded {
        headers.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn framing() {
        assert!(check_framing(&map(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&map(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_framing(&map(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]))
        .is_err());
        assert!(check_framing(&map(&[("transfer-encoding", "xchunked")])).is_err());
        assert!(check_framing(&map(&[("transfer-encoding", "chunked, identity")])).is_err());
        assert!(check_framing(&map(&[("content-length", "5"), ("content-length", "5")])).is_err());
        assert!(check_framing(&map(&[("content-length", "+5")])).is_err());
    }

    #[test]
    fn dot_segments() {
        assert_eq!(normalize_path("/a/b"), Ok(None));
        assert_eq!(
            normalize_path("/a/b/../c").unwrap().as_deref(),
            Some("/a/c")
        );
        assert_eq!(normalize_path("/a/..").unwrap().as_deref(), Some("/"));
        assert_eq!(normalize_path("/../../x").unwrap().as_deref(), Some("/x"));
        assert_eq!(
            normalize_path("/a/./b/.").unwrap().as_deref(),
            Some("/a/b/")
        );
        assert_eq!(normalize_path("/a..b/.c"), Ok(None));
        assert_eq!(
            normalize_path("/%61dmin/%7euser/a%2Fb%20%")
                .unwrap()
                .as_deref(),
            Some("/admin/~user/a%2Fb%20%")
        );
        assert_eq!(
            normalize_path("/a/%2e%2e%2e/x%2E/%").unwrap().as_deref(),
            Some("/a/.../x./%")
        );
        assert_eq!(normalize_path("/a%2"), Ok(None));
        assert_eq!(normalize_path("//a//b/").unwrap().as_deref(), Some("/a/b/"));
        assert_eq!(normalize_path("//").unwrap().as_deref(), Some("/"));
        assert_eq!(normalize_path("/a//../b").unwrap().as_deref(), Some("/b"));
        assert_eq!(normalize_path("/"), Ok(None));
        assert_eq!(normalize_path("/a/"), Ok(None));
        assert_eq!(normalize_path("/a%zz"), Ok(None));
        assert!(normalize_path("/api/%2e%2E/admin").is_err());
        assert!(normalize_path("/api/.%2e").is_err());
        assert!(normalize_path("x").is_err());
    }

    #[test]
    fn normalize_never_panics_and_yields_clean_paths() {
        let mut rng = fastrand::Rng::with_seed(11);
        let parts = ["/", ".", "..", "%2e", "%2E", "a", "", "//", "%"];
        for _ in 0..5000 {
            let path: String = (0..rng.usize(0..12))
                .map(|_| parts[rng.usize(..parts.len())])
                .collect();
            if let Ok(Some(clean)) = normalize_path(&path) {
                assert!(clean.starts_with('/'), "{path} -> {clean}");
                assert!(
                    !clean.split('/').any(|s| s == "." || s == ".."),
                    "{path} -> {clean}"
                );
                assert!(!clean.contains("//"), "{path} -> {clean}");
            }
        }
    }

    #[test]
    fn only_100_continue_is_an_expectation_we_meet() {
        for met in [
            &[][..],
            &[("expect", "100-continue")],
            &[("expect", "100-Continue")],
            &[("expect", "100-continue, ,100-CONTINUE")],
            &[("expect", "")],
        ] {
            assert!(!has_unmet_expectation(&map(met)), "{met:?}");
        }
        for unmet in [
            &[("expect", "foo")][..],
            &[("expect", "100-continue, foo")],
            &[("expect", "100-continue"), ("expect", "bar=1")],
            &[("expect", "100-continue;x")],
            &[("expect", "101-continue")],
        ] {
            assert!(has_unmet_expectation(&map(unmet)), "{unmet:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::EXPECT,
            HeaderValue::from_bytes(b"100-continue\xff").unwrap(),
        );
        assert!(has_unmet_expectation(&h));
    }

    #[test]
    fn repeated_host_is_refused() {
        assert!(check_framing(&map(&[("host", "a"), ("host", "b")])).is_err());
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("x-keep", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4")]);
        let client = ForwardingValues::new("[::1]:5000".parse().unwrap(), true);
        add_forwarding_headers(&mut h, &client, "a.example.com");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=1.2.3.4, for=\"[::1]\";proto=https;host=\"a.example.com\""
        );
    }

    #[test]
    fn forwarding_headers_of_one_connection_follow_its_requests() {
        let client = ForwardingValues::new("192.0.2.7:5000".parse().unwrap(), false);
        for host in [
            "a.example",
            "a.example",
            "b.example:8080",
            "bad\"host",
            "a.example",
        ] {
            let mut h = map(&[("x", "y")]);
            add_forwarding_headers(&mut h, &client, host);
            assert_eq!(h["x-forwarded-for"], "192.0.2.7");
            assert_eq!(h["x-forwarded-proto"], "http");
            let expected = if host.contains('"') {
                "for=192.0.2.7;proto=http".to_string()
            } else {
                format!("for=192.0.2.7;proto=http;host=\"{host}\"")
            };
            assert_eq!(h["forwarded"], expected.as_str());
        }
        // A request that brings its own lines still gets them kept, then the client.
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        add_forwarding_headers(&mut h, &client, "a.example");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 192.0.2.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn h2_cookie_fields_are_joined() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("x", "y")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut h = map(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h["x-request-id"], id.as_str());
    }

    #[test]
    fn hosts_are_a_host_and_an_optional_port() {
        for good in [
            "a",
            "a.example.com",
            "a.example.com:8080",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "my_host",
            "a:",
        ] {
            assert!(is_host_port(good.as_bytes()), "{good}");
        }
        for bad in [
            "a/b", "user@a", "a:port", "a:123456", ":80", "[::1", "[]:80", "[::1]x", "a b", "a:1:2",
        ] {
            assert!(!is_host_port(bad.as_bytes()), "{bad}");
        }
    }
}
