//! Semantic checks of a parsed [`Config`]: everything that serde cannot express (references
//! between sections, unique names, parseable addresses, regexes, status codes).

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{
    ActionConfig, Algorithm, Config, ConfigError, HashOn, PathMatchConfig, UpstreamProtocol,
    ViaSetting,
};
use crate::pipeline::via::is_token;
use crate::policy::PolicyConfig;

/// Largest member weight (each unit is 160 points on the hash ring).
pub const MAX_WEIGHT: u32 = 1000;

/// The methods of RFC 9110 and PATCH, whose lowercase spelling is surely a typo.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Headers of a fixed response that the proxy writes itself (RFC 9112 framing and
/// connection management).
const FRAMING_HEADERS: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
];

/// Whether listening on `a` and on `b` at once fails: the same port (0 is any free one) on
/// the same address, or on a wildcard address that covers the other (`[::]` covers IPv4
/// too, as sockets are dual-stack by default).
fn addrs_clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

impl Config {
    /// Checks the parsed config; the first problem found is returned.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(admin) = &self.admin {
            self.check_addr("admin.address", &admin.address)?;
        }
        for (field, value) in [
            (
                "header_read_timeout_ms",
                &self.server.header_read_timeout_ms,
            ),
            ("idle_timeout_ms", &self.server.idle_timeout_ms),
        ] {
            self.check_timeout(&format!("server.{field}"), value)?;
        }
        self.validate_via()?;
        self.validate_listeners()?;
        self.validate_upstreams()?;
        self.validate_routes()
    }

    fn check_addr(
        &self,
        field: &str,
        value: &toml::Spanned<String>,
    ) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse::<SocketAddr>().map_err(|e| {
            self.invalid(
                field,
                value,
                format!("`{}` is not an ip:port address: {e}", value.get_ref()),
            )
        })
    }

    /// Names identify listeners, groups and routes in logs, metrics and the admin API.
    fn check_name(&self, field: &str, name: &toml::Spanned<String>) -> Result<(), ConfigError> {
        if name.get_ref().trim().is_empty() {
            return Err(self.invalid(field, name, "a name must not be empty"));
        }
        Ok(())
    }

    /// A timeout of 0 would fail every request or close every connection at once (HAProxy
    /// users may expect it to mean "none").
    fn check_timeout(&self, field: &str, value: &toml::Spanned<u64>) -> Result<(), ConfigError> {
        if *value.get_ref() == 0 {
            return Err(self.invalid(
                field,
                value,
                "must be at least 1 (milliseconds); 0 would time out at once",
            ));
        }
        Ok(())
    }

    /// The `Via` pseudonym is a token (RFC 9110 7.6.3); the options that add to `Via` need it.
    fn validate_via(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        match server.via.get_ref() {
            ViaSetting::Pseudonym(name) if !is_token(name) => Err(self.invalid(
                "server.via",
                &server.via,
                format!(
                    "`{name}` is not a valid Via pseudonym: write a token (letters, digits and \
                     !#$%&'*+-.^_`|~, no spaces, `:` or `/`), or false to add no Via"
                ),
            )),
            ViaSetting::Pseudonym(_) => Ok(()),
            ViaSetting::Off => {
                for (field, on) in [
                    ("via_response", &server.via_response),
                    ("via_loop_detection", &server.via_loop_detection),
                ] {
                    if *on.get_ref() {
                        return Err(self.invalid(
                            format!("server.{field}"),
                            on,
                            "needs `via`, which is off: name a pseudonym with `via = \"...\"`",
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        // Addresses bound so far, with the field that binds each.
        let mut bound: Vec<(SocketAddr, String)> = Vec::new();
        if let Some(admin) = &self.admin {
            if let Ok(addr) = admin.address.get_ref().parse() {
                bound.push((addr, "admin.address".into()));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            self.check_name(&format!("listeners[{i}].name"), &l.name)?;
            if !names.insert(l.name.get_ref()) {
                return Err(self.invalid(
                    format!("listeners[{i}].name"),
                    &l.name,
                    "duplicate listener name",
                ));
            }
            let field = format!("listeners[{i}].address");
            let addr = self.check_addr(&field, &l.address)?;
            if let Some((_, other)) = bound.iter().find(|(b, _)| addrs_clash(*b, addr)) {
                return Err(self.invalid(
                    &field,
                    &l.address,
                    format!(
                        "`{}` overlaps `{other}`: both cannot listen on port {} at once",
                        l.address.get_ref(),
                        addr.port()
                    ),
                ));
            }
            bound.push((addr, field));
            if let Some(tls) = &l.tls {
                if tls.certs.get_ref().is_empty() {
                    return Err(self.invalid(
                        format!("listeners[{i}].tls.certs"),
                        &tls.certs,
                        "at least one certificate is required",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, g) in self.upstreams.iter().enumerate() {
            let at = format!("upstreams[{i}]");
            self.check_name(&format!("{at}.name"), &g.name)?;
            if !names.insert(g.name.get_ref()) {
                return Err(self.invalid(format!("{at}.name"), &g.name, "duplicate group name"));
            }
            if g.members.get_ref().is_empty() {
                return Err(self.invalid(
                    format!("{at}.members"),
                    &g.members,
                    "a group needs at least one member",
                ));
            }
            let mut seen = HashSet::new();
            for (j, m) in g.members.get_ref().iter().enumerate() {
                let field = format!("{at}.members[{j}].address");
                let addr = self.check_addr(&field, &m.address)?;
                if !seen.insert(addr) {
                    return Err(self.invalid(field, &m.address, "duplicate member address"));
                }
                if !(1..=MAX_WEIGHT).contains(&m.weight) {
                    return Err(self.invalid(
                        format!("{at}.members[{j}].weight"),
                        &m.address,
                        format!("weight must be between 1 and {MAX_WEIGHT}"),
                    ));
                }
            }
            match (g.algorithm, &g.hash_on) {
                (Algorithm::ConsistentHash, None) => {
                    return Err(self.invalid(
                        format!("{at}.algorithm"),
                        &g.name,
                        "consistent_hash needs `hash_on`",
                    ))
                }
                (Algorithm::ConsistentHash, Some(h)) => {
                    let bad = match h.get_ref() {
                        HashOn::Header(name) => {
                            http::HeaderName::from_bytes(name.as_bytes()).is_err()
                        }
                        HashOn::Cookie(name) => {
                            name.is_empty() || name.contains([';', '=', ' ', ','])
                        }
                        HashOn::ClientIp => false,
                    };
                    if bad {
                        return Err(self.invalid(
                            format!("{at}.hash_on"),
                            h,
                            "not a valid header or cookie name: no request could carry it, so \
                             requests would be spread at random",
                        ));
                    }
                }
                (_, None) => {}
                (_, Some(h)) => {
                    return Err(self.invalid(
                        format!("{at}.hash_on"),
                        h,
                        "hash_on is only used with algorithm = \"consistent_hash\"",
                    ))
                }
            }
            match (g.protocol, &g.tls) {
                (UpstreamProtocol::H2, None) => return Err(self.invalid(
                    format!("{at}.protocol"),
                    &g.name,
                    "protocol = \"h2\" is HTTP/2 over TLS and needs `tls` (h2c: over plain TCP)",
                )),
                (UpstreamProtocol::H2c, Some(tls)) => return Err(self.invalid(
                    format!("{at}.tls"),
                    tls,
                    "protocol = \"h2c\" is HTTP/2 over plain TCP; with tls use protocol = \"h2\"",
                )),
                _ => {}
            }
            if let Some(tls) = &g.tls {
                let t = tls.get_ref();
                if t.client_cert.is_some() != t.client_key.is_some() {
                    return Err(self.invalid(
                        format!("{at}.tls"),
                        tls,
                        "client_cert and client_key go together",
                    ));
                }
                if let Some(name) = &t.server_name {
                    if rustls::pki_types::ServerName::try_from(name.get_ref().as_str()).is_err() {
                        return Err(self.invalid(
                            format!("{at}.tls.server_name"),
                            name,
                            "not a DNS name or IP address",
                        ));
                    }
                }
            }
            self.check_timeout(&format!("{at}.connect_timeout_ms"), &g.connect_timeout_ms)?;
            self.check_timeout(&format!("{at}.request_timeout_ms"), &g.request_timeout_ms)?;
            if *g.idle_timeout_ms.get_ref() == 0 {
                return Err(self.invalid(
                    format!("{at}.idle_timeout_ms"),
                    &g.idle_timeout_ms,
                    "must be at least 1 (milliseconds); to keep no idle connections to the \
                     members, set max_idle_per_member = 0",
                ));
            }
            let passive = &g.passive_health;
            if passive.consecutive_failures > 0 && passive.ejection_ms == 0 {
                return Err(self.invalid(
                    format!("{at}.passive_health.ejection_ms"),
                    &g.name,
                    "must be at least 1: a member ejected for 0 ms is never ejected; set \
                     consecutive_failures = 0 to turn passive health checks off",
                ));
            }
            if let Some(hc) = &g.health_check {
                self.check_timeout(&format!("{at}.health_check.timeout_ms"), &hc.timeout_ms)?;
                if hc.path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(self.invalid(
                        format!("{at}.health_check.path"),
                        &g.name,
                        format!("`{}` is not a valid request path", hc.path),
                    ));
                }
                if !hc.path.starts_with('/') {
                    return Err(self.invalid(
                        format!("{at}.health_check.path"),
                        &g.name,
                        format!("`{}` must start with `/`", hc.path),
                    ));
                }
                for (field, value) in [
                    ("interval_ms", hc.interval_ms),
                    ("rise", hc.rise.into()),
                    ("fall", hc.fall.into()),
                ] {
                    if value == 0 {
                        return Err(self.invalid(
                            format!("{at}.health_check.{field}"),
                            &g.name,
                            "must be at least 1",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        let groups: HashSet<&String> = self.upstreams.iter().map(|g| g.name.get_ref()).collect();
        let mut names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            self.check_name(&format!("{at}.name"), &r.name)?;
            if !names.insert(r.name.get_ref()) {
                return Err(self.invalid(format!("{at}.name"), &r.name, "duplicate route name"));
            }
            if let Some(host) = &r.matcher.host {
                let h = host.get_ref();
                let rest = h.strip_prefix("*.").unwrap_or(h);
                if rest.is_empty() || rest.contains('*') || rest.contains('/') {
                    return Err(self.invalid(
                        format!("{at}.match.host"),
                        host,
                        "expected `name.example.com` or `*.example.com`",
                    ));
                }
                // Routes see the request's host without its port (and an IPv6 literal
                // without brackets), so a pattern with either could never match.
                if rest.contains('[') || rest.contains(']') {
                    return Err(self.invalid(
                        format!("{at}.match.host"),
                        host,
                        "write an IPv6 host without brackets (`::1`, not `[::1]`)",
                    ));
                }
                if rest.contains(':') && rest.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(self.invalid(
                        format!("{at}.match.host"),
                        host,
                        "a route host must not include a port: routes match the request's host \
                         without its port",
                    ));
                }
            }
            if let Some(path) = &r.matcher.path {
                let field = format!("{at}.match.path");
                match path.get_ref() {
                    PathMatchConfig::Exact(p) | PathMatchConfig::Prefix(p) => {
                        if !p.starts_with('/') {
                            return Err(self.invalid(field, path, "path must start with `/`"));
                        }
                    }
                    PathMatchConfig::Regex(re) => {
                        if let Err(e) = regex::Regex::new(re) {
                            return Err(self.invalid(field, path, format!("invalid regex: {e}")));
                        }
                    }
                }
            }
            for (j, m) in r.matcher.methods.iter().enumerate() {
                let field = format!("{at}.match.methods[{j}]");
                if http::Method::from_bytes(m.get_ref().as_bytes()).is_err() {
                    return Err(self.invalid(field, m, "not an HTTP method"));
                }
                // Methods are case-sensitive: `get` never matches a GET request.
                let upper = m.get_ref().to_ascii_uppercase();
                if upper != *m.get_ref() && STANDARD_METHODS.contains(&upper.as_str()) {
                    return Err(self.invalid(
                        field,
                        m,
                        format!("methods are case-sensitive: write `{upper}`"),
                    ));
                }
            }
            for (name, value) in &r.matcher.headers {
                let field = format!("{at}.match.headers.{name}");
                if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(value.get_ref()).is_err()
                {
                    return Err(self.invalid(field, value, "invalid header name or value"));
                }
            }
            self.validate_action(&at, r.action.get_ref(), &r.action, &groups)?;
            for (j, p) in r.policies.iter().enumerate() {
                let PolicyConfig::Version(v) = p else {
                    continue;
                };
                for (version, entry) in &v.versions {
                    if !groups.contains(&entry.upstream) {
                        return Err(self.invalid(
                            format!("{at}.policies[{j}].versions.{version}.upstream"),
                            &r.name,
                            format!(
                                "route `{}`: no upstream group named `{}`",
                                r.name.get_ref(),
                                entry.upstream
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_action(
        &self,
        at: &str,
        action: &ActionConfig,
        spanned: &toml::Spanned<ActionConfig>,
        groups: &HashSet<&String>,
    ) -> Result<(), ConfigError> {
        match action {
            ActionConfig::Forward(f) => {
                if !groups.contains(f.group.get_ref()) {
                    return Err(self.invalid(
                        format!("{at}.action.forward.group"),
                        &f.group,
                        format!("no upstream group named `{}`", f.group.get_ref()),
                    ));
                }
                if let (Some(_), Some(rw)) = (&f.strip_prefix, &f.rewrite_path) {
                    return Err(self.invalid(
                        format!("{at}.action.forward.rewrite_path"),
                        rw,
                        "use either strip_prefix or rewrite_path, not both",
                    ));
                }
                for (name, v) in [
                    ("strip_prefix", &f.strip_prefix),
                    ("rewrite_path", &f.rewrite_path),
                ] {
                    if let Some(v) = v {
                        if !v.get_ref().starts_with('/') {
                            return Err(self.invalid(
                                format!("{at}.action.forward.{name}"),
                                v,
                                "must start with `/`",
                            ));
                        }
                        // Every request would fail with 400 when its new path does not parse.
                        if v.get_ref().parse::<http::uri::PathAndQuery>().is_err()
                            || v.get_ref().contains(['?', '#'])
                        {
                            return Err(self.invalid(
                                format!("{at}.action.forward.{name}"),
                                v,
                                format!(
                                    "`{}` is not a valid path: percent-encode spaces and \
                                     other characters a URL path cannot hold",
                                    v.get_ref()
                                ),
                            ));
                        }
                    }
                }
            }
            ActionConfig::Redirect(r) => {
                if ![301, 302, 303, 307, 308].contains(r.status.get_ref()) {
                    let span = if r.status.span() == (0..0) {
                        spanned.span()
                    } else {
                        r.status.span()
                    };
                    return Err(ConfigError::Invalid {
                        field: format!("{at}.action.redirect.status"),
                        line: self.line_of(span),
                        message: "redirect status must be 301, 302, 303, 307 or 308".into(),
                    });
                }
                if r.location.get_ref().trim().is_empty() {
                    return Err(self.invalid(
                        format!("{at}.action.redirect.location"),
                        &r.location,
                        "a redirect needs a location",
                    ));
                }
                if http::HeaderValue::from_str(r.location.get_ref()).is_err() {
                    return Err(self.invalid(
                        format!("{at}.action.redirect.location"),
                        &r.location,
                        "not a valid header value",
                    ));
                }
                let variables = &crate::routing::REDIRECT_VARIABLES;
                if let (_, Some(problem)) =
                    crate::template::Template::parse(r.location.get_ref(), variables)
                {
                    return Err(self.invalid(
                        format!("{at}.action.redirect.location"),
                        &r.location,
                        problem,
                    ));
                }
            }
            ActionConfig::Fixed(f) => {
                // 1xx are interim responses: a client would wait for a final one.
                if !(200..=599).contains(f.status.get_ref()) {
                    return Err(self.invalid(
                        format!("{at}.action.fixed.status"),
                        &f.status,
                        "status must be between 200 and 599",
                    ));
                }
                for (name, value) in &f.headers {
                    // The proxy frames the body it sends; a header that claims another
                    // framing would make the client wait for bytes that never come.
                    if FRAMING_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                        return Err(self.invalid(
                            format!("{at}.action.fixed.headers.{name}"),
                            value,
                            format!(
                                "`{name}` is set by the proxy from the body and the \
                                 connection; remove it"
                            ),
                        ));
                    }
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                        || http::HeaderValue::from_str(value.get_ref()).is_err()
                    {
                        return Err(self.invalid(
                            format!("{at}.action.fixed.headers.{name}"),
                            value,
                            "invalid header name or value",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[upstreams]]
name = "api"
members = [{ address = "127.0.0.1:9000" }]

[[routes]]
name = "api"
match = { host = "*.example.com", path = { prefix = "/api" } }
action = { forward = { group = "api", strip_prefix = "/api" } }
"#;

    #[test]
    fn good_config_loads() {
        let c = Config::from_toml_str(GOOD).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.upstreams[0].algorithm, Algorithm::RoundRobin);
    }

    #[test]
    fn unknown_group_names_field_and_line() {
        let text = GOOD.replace("group = \"api\"", "group = \"nope\"");
        let err = Config::from_toml_str(&text).unwrap_err();
        match err {
            ConfigError::Invalid { field, line, .. } => {
                assert_eq!(field, "routes[0].action.forward.group");
                assert_eq!(line, 13);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unknown_field_is_a_parse_error_with_line() {
        let text = GOOD.replace("name = \"web\"", "name = \"web\"\nbogus = 1");
        let msg = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(msg.contains("line 4"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    fn with_server(server: &str) -> String {
        format!("[server]\n{server}\n{GOOD}")
    }

    #[test]
    fn via_defaults_to_l7_proxy_on_requests_only() {
        let c = Config::from_toml_str(GOOD).unwrap();
        assert_eq!(
            c.server.via.get_ref(),
            &ViaSetting::Pseudonym("l7-proxy".into())
        );
        let via = c.server.via_header.expect("Via is on by default");
        assert!(!via.on_responses && !via.loop_detection);
        let mut headers = http::HeaderMap::new();
        via.add_to_request(&mut headers, http::Version::HTTP_11)
            .unwrap();
        assert_eq!(headers["via"], "1.1 l7-proxy");
    }

    #[test]
    fn via_takes_a_pseudonym_true_or_false() {
        for (line, expected) in [
            ("via = \"edge-1.example.com\"", Some("edge-1.example.com")),
            ("via = true", Some("l7-proxy")),
            ("via = false", None),
            ("via = \"\"", None),
        ] {
            let c = Config::from_toml_str(&with_server(line)).unwrap();
            let mut headers = http::HeaderMap::new();
            if let Some(via) = &c.server.via_header {
                via.add_to_request(&mut headers, http::Version::HTTP_2)
                    .unwrap();
            }
            let got = headers.get("via").map(|v| v.to_str().unwrap().to_string());
            assert_eq!(got, expected.map(|name| format!("2 {name}")), "{line}");
        }
        let c = Config::from_toml_str(&with_server(
            "via = \"gw\"\nvia_response = true\nvia_loop_detection = true",
        ))
        .unwrap();
        let via = c.server.via_header.unwrap();
        assert!(via.on_responses && via.loop_detection);
    }

    #[test]
    fn a_via_pseudonym_that_is_no_token_names_the_field_and_line() {
        for bad in ["l7 proxy", "gw:8080", "a/b", "a,b", "(gw)", "prox\u{e9}"] {
            let text = with_server(&format!("via = \"{bad}\""));
            match Config::from_toml_str(&text).unwrap_err() {
                ConfigError::Invalid {
                    field,
                    line,
                    message,
                } => {
                    assert_eq!(field, "server.via", "{bad}");
                    assert_eq!(line, 2, "{bad}");
                    assert!(message.contains("not a valid Via pseudonym"), "{message}");
                }
                other => panic!("{bad}: unexpected {other}"),
            }
        }
        let msg = Config::from_toml_str(&with_server("via = 3"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("a pseudonym (string) or false"), "{msg}");
    }

    #[test]
    fn via_options_need_via() {
        for option in ["via_response", "via_loop_detection"] {
            let text = with_server(&format!("via = false\n{option} = true"));
            match Config::from_toml_str(&text).unwrap_err() {
                ConfigError::Invalid { field, line, .. } => {
                    assert_eq!(field, format!("server.{option}"));
                    assert_eq!(line, 3);
                }
                other => panic!("unexpected {other}"),
            }
            // Off is fine without Via.
            let text = with_server(&format!("via = false\n{option} = false"));
            assert!(Config::from_toml_str(&text).is_ok(), "{option}");
        }
    }

    #[test]
    fn bad_regex_is_rejected() {
        let text = GOOD.replace("{ prefix = \"/api\" }", "{ regex = \"(\" }");
        let msg = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(msg.contains("routes[0].match.path"), "{msg}");
        assert!(msg.contains("line 12"), "{msg}");
    }

    /// The error of `text`, which must be refused, as (field, message).
    fn refusal(text: &str) -> (String, String) {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid { field, message, .. }) => (field, message),
            Err(other) => panic!("not a validation error: {other}"),
            Ok(_) => panic!("accepted:\n{text}"),
        }
    }

    #[test]
    fn listeners_that_cannot_bind_together_are_refused() {
        let two = |a: &str, b: &str| {
            format!(
                "[[listeners]]\nname = \"a\"\naddress = \"{a}\"\n\
                 [[listeners]]\nname = \"b\"\naddress = \"{b}\"\n"
            )
        };
        for (a, b) in [
            ("[::1]:28080", "[0:0::1]:28080"),
            ("0.0.0.0:28080", "127.0.0.1:28080"),
            ("127.0.0.1:28080", "0.0.0.0:28080"),
            ("[::]:28080", "10.0.0.1:28080"),
        ] {
            let (field, message) = refusal(&two(a, b));
            assert_eq!(field, "listeners[1].address");
            assert!(
                message.contains("overlaps `listeners[0].address`"),
                "{message}"
            );
        }
        // Other ports, an IPv4 wildcard beside IPv6, and port 0 (any free port) are fine.
        for (a, b) in [
            ("127.0.0.1:28080", "127.0.0.1:28081"),
            ("0.0.0.0:28080", "[::1]:28080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            Config::from_toml_str(&two(a, b)).unwrap();
        }
        let admin = "[admin]\naddress = \"127.0.0.1:28090\"\n\
                     [[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:28090\"\n";
        let (field, message) = refusal(admin);
        assert_eq!(field, "listeners[0].address");
        assert!(message.contains("overlaps `admin.address`"), "{message}");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_by_name() {
        let cases = [
            (GOOD.replace("name = \"web\"", "name = \"\""), "listeners[0].name", "must not be empty"),
            (GOOD.replace("name = \"api\"\nmembers", "name = \" \"\nmembers"), "upstreams[0].name", "must not be empty"),
            (
                GOOD.replace("members = [", "health_check = { interval_ms = 0 }\nmembers = ["),
                "upstreams[0].health_check.interval_ms",
                "at least 1",
            ),
            (
                GOOD.replace("members = [", "health_check = { rise = 0 }\nmembers = ["),
                "upstreams[0].health_check.rise",
                "at least 1",
            ),
            (
                GOOD.replace("members = [", "passive_health = { ejection_ms = 0 }\nmembers = ["),
                "upstreams[0].passive_health.ejection_ms",
                "consecutive_failures = 0",
            ),
            (
                GOOD.replace(
                    "members = [",
                    "algorithm = \"consistent_hash\"\nhash_on = { header = \"x user\" }\nmembers = [",
                ),
                "upstreams[0].hash_on",
                "not a valid header or cookie name",
            ),
            (
                GOOD.replace("strip_prefix = \"/api\"", "rewrite_path = \"/a b\""),
                "routes[0].action.forward.rewrite_path",
                "`/a b` is not a valid path",
            ),
            (
                GOOD.replace(
                    "action = { forward = { group = \"api\", strip_prefix = \"/api\" } }",
                    "action = { redirect = { location = \"\" } }",
                ),
                "routes[0].action.redirect.location",
                "needs a location",
            ),
            (
                GOOD.replace(
                    "action = { forward = { group = \"api\", strip_prefix = \"/api\" } }",
                    "action = { fixed = { status = 101 } }",
                ),
                "routes[0].action.fixed.status",
                "between 200 and 599",
            ),
            (
                GOOD.replace(
                    "action = { forward = { group = \"api\", strip_prefix = \"/api\" } }",
                    "action = { fixed = { body = \"hello\", headers = { Content-Length = \"99\" } } }",
                ),
                "routes[0].action.fixed.headers.Content-Length",
                "set by the proxy",
            ),
            (
                format!(
                    "{GOOD}policies = [{{ type = \"version\", default = \"v1\", versions = \
                     {{ v1 = {{ upstream = \"api\" }}, v2 = {{ upstream = \"api-v2\" }} }} }}]\n"
                ),
                "routes[0].policies[0].versions.v2.upstream",
                "route `api`: no upstream group named `api-v2`",
            ),
        ];
        for (text, want_field, want) in cases {
            let (field, message) = refusal(&text);
            assert_eq!(field, want_field, "{message}");
            assert!(
                message.contains(want),
                "{field}: {message:?} lacks {want:?}"
            );
        }
    }
}
