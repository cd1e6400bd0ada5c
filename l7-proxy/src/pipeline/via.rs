//! The `Via` header (RFC 9110 7.6.3): a gateway must add it to the requests it forwards
//! inbound, and may add it to the responses it passes back.
//!
//! Each entry is `received-protocol received-by`: the version of the message as this proxy
//! received it (`1.0`, `1.1`, `2`: the client's side for requests, the member's for
//! responses) and the configured pseudonym, as in `Via: 1.1 l7-proxy`. A message that already
//! has a `Via` gets our entry appended to its list, earlier entries kept in order.
//!
//! [`ViaHeader`] is built once per config generation (`[server] via`, see
//! [`crate::config::ServerConfig`]) with one ready value per protocol version, so a request
//! without a `Via` costs one header insert. Only a message that already carries one pays for
//! joining the list, and for the loop check when `via_loop_detection` is on.

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderValue};
use http::Version;

use super::headers::list_items;

/// The pseudonym used when the config names none.
pub const DEFAULT_PSEUDONYM: &str = "l7-proxy";

/// The `Via` entries of one config generation.
#[derive(Debug)]
pub struct ViaHeader {
    pseudonym: Box<str>,
    /// `<version> <pseudonym>` for HTTP/0.9, 1.0, 1.1, 2 and 3, in [`version_index`] order.
    entries: [HeaderValue; 5],
    /// Add the entry to responses from members too.
    pub on_responses: bool,
    /// Refuse requests whose `Via` already names this pseudonym (508).
    pub loop_detection: bool,
}

/// The request's `Via` names this proxy: it came back to us (a forwarding loop).
#[derive(Debug, PartialEq, Eq)]
pub struct LoopDetected;

/// Whether `text` is an RFC 9110 token (`1*tchar`), as a `Via` pseudonym must be.
pub fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `received-protocol` of a message of `version` (RFC 9110 7.6.3: `major[.minor]`).
fn version_index(version: Version) -> usize {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

impl ViaHeader {
    /// The entries for `pseudonym`; `None` when it is not a token.
    pub fn new(pseudonym: &str, on_responses: bool, loop_detection: bool) -> Option<Self> {
        if !is_token(pseudonym) {
            return None;
        }
        let entry = |protocol: &str| HeaderValue::try_from(format!("{protocol} {pseudonym}"));
        Some(Self {
            pseudonym: pseudonym.into(),
            entries: [
                entry("0.9").ok()?,
                entry("1.0").ok()?,
                entry("1.1").ok()?,
                entry("2").ok()?,
                entry("3").ok()?,
            ],
            on_responses,
            loop_detection,
        })
    }

    /// Appends our entry to the `Via` of a request the client sent in `version`; with loop
    /// detection, refuses a request whose `Via` already has an entry received by us.
    pub fn add_to_request(
        &self,
        headers: &mut HeaderMap,
        version: Version,
    ) -> Result<(), LoopDetected> {
        if self.loop_detection && self.names_us(headers) {
            return Err(LoopDetected);
        }
        append(headers, &self.entries[version_index(version)]);
        Ok(())
    }

    /// Appends our entry to the `Via` of a response a member sent in `version`, when
    /// configured to.
    pub fn add_to_response(&self, headers: &mut HeaderMap, version: Version) {
        if self.on_responses {
            append(headers, &self.entries[version_index(version)]);
        }
    }

    /// Whether an entry of `Via` was received by this pseudonym (ASCII case-insensitive, as
    /// host names are). The second word of an entry is its `received-by`; a comment after it
    /// is ignored.
    fn names_us(&self, headers: &HeaderMap) -> bool {
        list_items(headers, &header::VIA).any(|entry| {
            entry
                .split_ascii_whitespace()
                .nth(1)
                .is_some_and(|by| by.eq_ignore_ascii_case(&self.pseudonym))
        })
    }
}

/// Appends `ours` to the `Via` list: inserted alone when there is none, else every earlier
/// line joined with `, ` and ours last, in one line (RFC 9110 5.3: the same list), so that an
/// upstream that reads only the first line still sees all of it.
fn append(headers: &mut HeaderMap, ours: &HeaderValue) {
    match headers.entry(header::VIA) {
        Entry::Vacant(slot) => {
            slot.insert(ours.clone());
        }
        Entry::Occupied(mut lines) => {
            let mut joined = Vec::with_capacity(64);
            for line in lines.iter().filter(|line| !line.is_empty()) {
                joined.extend_from_slice(line.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(ours.as_bytes());
            // Valid values joined by ", " are a valid value.
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
                lines.insert(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(header::VIA)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn tokens() {
        assert!(is_token("l7-proxy"));
        assert!(is_token("gw.example.com"));
        assert!(is_token("A~b_c|d"));
        for bad in [
            "",
            "l7 proxy",
            "host:8080",
            "a/b",
            "a,b",
            "(x)",
            "é",
            "a\"b",
            "a;b",
        ] {
            assert!(!is_token(bad), "{bad:?}");
            assert!(ViaHeader::new(bad, false, false).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn request_entry_names_the_client_version() {
        let via_header = ViaHeader::new("edge", false, false).unwrap();
        for (version, expected) in [
            (Version::HTTP_10, "1.0 edge"),
            (Version::HTTP_11, "1.1 edge"),
            (Version::HTTP_2, "2 edge"),
        ] {
            let mut h = HeaderMap::new();
            via_header.add_to_request(&mut h, version).unwrap();
            assert_eq!(via(&h), [expected]);
        }
    }

    #[test]
    fn earlier_entries_are_kept_in_order_in_one_line() {
        let via_header = ViaHeader::new("edge", false, false).unwrap();
        let mut h = HeaderMap::new();
        h.append(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 p.example.net"),
        );
        h.append(header::VIA, HeaderValue::from_static(""));
        h.append(
            header::VIA,
            HeaderValue::from_static("HTTP/1.1 cache (Squid)"),
        );
        via_header.add_to_request(&mut h, Version::HTTP_11).unwrap();
        assert_eq!(
            via(&h),
            ["1.0 fred, 1.1 p.example.net, HTTP/1.1 cache (Squid), 1.1 edge"]
        );
    }

    #[test]
    fn responses_get_an_entry_only_when_asked() {
        let mut h = HeaderMap::new();
        let off = ViaHeader::new("edge", false, false).unwrap();
        off.add_to_response(&mut h, Version::HTTP_11);
        assert!(h.is_empty());
        let on = ViaHeader::new("edge", true, false).unwrap();
        on.add_to_response(&mut h, Version::HTTP_2);
        assert_eq!(via(&h), ["2 edge"]);
    }

    #[test]
    fn a_loop_is_our_own_pseudonym_as_received_by() {
        let detecting = ViaHeader::new("edge", false, true).unwrap();
        let mut looped = HeaderMap::new();
        looped.insert(
            header::VIA,
            HeaderValue::from_static("1.1 a, 1.1 EDGE (l7)"),
        );
        assert_eq!(
            detecting.add_to_request(&mut looped.clone(), Version::HTTP_11),
            Err(LoopDetected)
        );
        // Our name as a protocol, a comment or part of another name is no loop.
        let mut other = HeaderMap::new();
        other.insert(
            header::VIA,
            HeaderValue::from_static("1.1 edge2, edge x, 1.1 a (edge)"),
        );
        assert!(detecting
            .add_to_request(&mut other, Version::HTTP_11)
            .is_ok());
        // Without detection the entry is appended as usual.
        let plain = ViaHeader::new("edge", false, false).unwrap();
        plain.add_to_request(&mut looped, Version::HTTP_11).unwrap();
        assert_eq!(via(&looped), ["1.1 a, 1.1 EDGE (l7), 1.1 edge"]);
    }
}
