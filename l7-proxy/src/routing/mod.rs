//! Route matching: which configured route handles a request.
//!
//! A [`RouteTable`] is compiled from the config's `[[routes]]` once per config generation.
//! [`RouteTable::find`] takes the request's host (from the URI authority for HTTP/2, else the
//! `Host` header, port removed, lowercased), path, method and headers, and returns the winning
//! route.
//!
//! # Precedence
//!
//! All conditions of a route must hold for it to match. Among matching routes the most
//! specific wins, compared in this order:
//!
//! 1. host: exact host > wildcard host (`*.example.com`; a longer suffix beats a shorter one)
//!    > no host condition;
//! 2. path: exact path > prefix (the longest prefix wins) > regex > no path condition;
//! 3. ties: the route that comes first in the config file.
//!
//! Methods and headers only filter; they do not make a route more specific. Put a narrower
//! route (say, a canary selected by a header) before the broader one with the same host and
//! path.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use crate::config::{ActionConfig, Config, ConfigError, PathMatchConfig, RouteConfig};
use crate::policy::{self, PolicyChain};
use crate::template::{Fill, HeaderTemplate, Template};

/// What a redirect's `Location` is filled from: the request as the route sees it.
pub struct RedirectCtx {
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// The request's host, without port, lowercase (as routes match it).
    pub host: String,
    pub uri: http::Uri,
}

/// The variables of a redirect `location`, as nginx's: `${scheme}`, `${host}` (no port),
/// `${request_uri}` (path and query), `${path}` and `${query}` (without `?`; empty when
/// there is none). `https://${host}${request_uri}` sends a plain-HTTP client to HTTPS.
pub const REDIRECT_VARIABLES: [(&str, Fill<RedirectCtx>); 5] = [
    ("scheme", |c, out| {
        out.push_str(if c.tls { "https" } else { "http" })
    }),
    ("host", |c, out| out.push_str(&c.host)),
    ("request_uri", |c, out| {
        out.push_str(c.uri.path_and_query().map_or("/", |p| p.as_str()))
    }),
    ("path", |c, out| out.push_str(c.uri.path())),
    ("query", |c, out| out.push_str(c.uri.query().unwrap_or(""))),
];

/// How a route matches the host.
#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// The suffix including the leading dot: `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// What to do with a matched request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward {
        group: String,
        strip_prefix: Option<String>,
        rewrite_path: Option<String>,
    },
    Redirect {
        status: StatusCode,
        location: HeaderTemplate<RedirectCtx>,
    },
    Fixed {
        status: StatusCode,
        body: bytes::Bytes,
        headers: HeaderMap,
    },
}

/// A compiled route.
pub struct Route {
    pub name: String,
    /// The route's request series (counts by status, latency).
    pub metrics: crate::metrics::RouteMetrics,
    host: HostMatch,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub action: RouteAction,
    pub policies: PolicyChain,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("path", &self.path)
            .field("action", &self.action)
            .field("policies", &self.policies.len())
            .finish()
    }
}

/// The request facts routing looks at.
pub struct RouteInput<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// Routes in precedence order: the first that matches wins.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl Route {
    fn compile(config: &Config, index: usize, rc: &RouteConfig) -> Result<Self, ConfigError> {
        let host = match rc
            .matcher
            .host
            .as_ref()
            .map(|h| h.get_ref().to_ascii_lowercase())
        {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Wildcard(suffix.to_string()),
                None => HostMatch::Exact(h),
            },
        };
        let path = match rc.matcher.path.as_ref().map(|p| p.get_ref()) {
            None => PathMatch::Any,
            Some(PathMatchConfig::Exact(p)) => PathMatch::Exact(p.clone()),
            Some(PathMatchConfig::Prefix(p)) => PathMatch::Prefix(p.clone()),
            // Validated at load; compiling again here cannot fail.
            Some(PathMatchConfig::Regex(re)) => PathMatch::Regex(Regex::new(re).map_err(|e| {
                config.invalid(
                    format!("routes[{index}].match.path"),
                    rc.matcher.path.as_ref().expect("path is set"),
                    e.to_string(),
                )
            })?),
        };
        let methods = rc
            .matcher
            .methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.get_ref().as_bytes()).ok())
            .collect();
        let headers = header_pairs(rc.matcher.headers.iter().map(|(k, v)| (k, v.get_ref())));
        let action = match rc.action.get_ref() {
            ActionConfig::Forward(f) => RouteAction::Forward {
                group: f.group.get_ref().clone(),
                strip_prefix: f.strip_prefix.as_ref().map(|s| s.get_ref().clone()),
                rewrite_path: f.rewrite_path.as_ref().map(|s| s.get_ref().clone()),
            },
            ActionConfig::Redirect(r) => RouteAction::Redirect {
                status: StatusCode::from_u16(*r.status.get_ref()).unwrap_or(StatusCode::FOUND),
                location: HeaderTemplate::new(
                    r.location.get_ref(),
                    Template::parse(r.location.get_ref(), &REDIRECT_VARIABLES).0,
                )
                // Checked at load (variables and header value).
                .unwrap_or(HeaderTemplate::Fixed(HeaderValue::from_static("/"))),
            },
            ActionConfig::Fixed(f) => RouteAction::Fixed {
                status: StatusCode::from_u16(*f.status.get_ref()).unwrap_or(StatusCode::OK),
                body: bytes::Bytes::from(f.body.clone()),
                headers: header_pairs(f.headers.iter().map(|(k, v)| (k, v.get_ref())))
                    .into_iter()
                    .collect(),
            },
        };
        let policies = policy::build_chain_at(&rc.policies).map_err(|(at, e)| {
            let field = match at {
                Some(j) => format!("routes[{index}].policies[{j}]"),
                None => format!("routes[{index}].policies"),
            };
            config.invalid(
                field,
                &rc.name,
                format!("route `{}`: {e}", rc.name.get_ref()),
            )
        })?;
        Ok(Self {
            name: rc.name.get_ref().clone(),
            metrics: crate::metrics::RouteMetrics::new(rc.name.get_ref().clone()),
            host,
            path,
            methods,
            headers,
            action,
            policies,
        })
    }

    /// Sort key: larger is more specific.
    fn specificity(&self) -> (u8, usize, u8, usize) {
        let (host_rank, host_len) = match &self.host {
            HostMatch::Exact(_) => (2, 0),
            HostMatch::Wildcard(s) => (1, s.len()),
            HostMatch::Any => (0, 0),
        };
        let (path_rank, path_len) = match &self.path {
            PathMatch::Exact(_) => (3, 0),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(_) => (1, 0),
            PathMatch::Any => (0, 0),
        };
        (host_rank, host_len, path_rank, path_len)
    }

    fn matches(&self, input: &RouteInput<'_>) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => input.host == h,
            HostMatch::Wildcard(suffix) => {
                input.host.len() > suffix.len() && input.host.ends_with(suffix.as_str())
            }
        };
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => input.path == p,
            PathMatch::Prefix(p) => prefix_matches(input.path, p),
            PathMatch::Regex(re) => re.is_match(input.path),
        };
        host_ok
            && path_ok
            && (self.methods.is_empty() || self.methods.contains(input.method))
            && self
                .headers
                .iter()
                .all(|(name, value)| input.headers.get_all(name).iter().any(|v| v == value))
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x` but not `/apix`; a prefix ending in `/`
/// matches anything below it.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

fn header_pairs<'a>(
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
) -> Vec<(HeaderName, HeaderValue)> {
    pairs
        .filter_map(|(k, v)| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

impl RouteTable {
    /// Compiles the config's routes, building each route's policy chain.
    pub fn build(config: &Config) -> Result<Self, ConfigError> {
        let mut routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, rc)| Route::compile(config, i, rc).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        // Stable sort: equal specificity keeps config order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        Ok(Self { routes })
    }

    /// The winning route for a request, if any.
    pub fn find(&self, input: &RouteInput<'_>) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(input))
    }

    /// Replaces a route's policy chain (tests inject policies the config cannot express).
    #[cfg(test)]
    pub(crate) fn set_policies(&mut self, route: &str, chain: PolicyChain) {
        for r in &mut self.routes {
            if r.name == route {
                if let Some(r) = Arc::get_mut(r) {
                    r.policies = chain.clone();
                }
            }
        }
    }

    /// Routes by name (for metrics and tests).
    pub fn by_name(&self) -> HashMap<&str, &Arc<Route>> {
        self.routes.iter().map(|r| (r.name.as_str(), r)).collect()
    }
}

/// Applies a forward action's path change to a path-and-query. `strip_prefix` removes whole
/// path segments only; a path it does not start is forwarded unchanged.
pub fn rewrite_path(
    path: &str,
    query: Option<&str>,
    strip_prefix: Option<&str>,
    rewrite: Option<&str>,
) -> String {
    let new_path = if let Some(p) = rewrite {
        p.to_string()
    } else if let Some(prefix) = strip_prefix {
        // Whole segments only: `/api` comes off `/api` and `/api/x`, never off `/apix`.
        match path.strip_prefix(prefix.trim_end_matches('/')) {
            Some("") => "/".to_string(),
            Some(rest) if rest.starts_with('/') => rest.to_string(),
            _ => path.to_string(),
        }
    } else {
        path.to_string()
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            "[[upstreams]]\nname = \"g\"\nmembers = [{{ address = \"127.0.0.1:1\" }}]\n{routes}"
        );
        RouteTable::build(&Config::from_toml_str(&text).unwrap()).unwrap()
    }

    fn find<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        let headers = HeaderMap::new();
        t.find(&RouteInput {
            host,
            path,
            method: &Method::GET,
            headers: &headers,
        })
        .map(|r| r.name.as_str())
    }

    const FIXED: &str = "action = { fixed = { status = 200 } }";

    #[test]
    fn precedence_host_then_path_then_order() {
        let t = table(&format!(
            r#"
[[routes]]
name = "any"
{FIXED}
[[routes]]
name = "wild"
match = {{ host = "*.example.com" }}
{FIXED}
[[routes]]
name = "exact-host"
match = {{ host = "a.example.com" }}
{FIXED}
[[routes]]
name = "exact-host-prefix"
match = {{ host = "a.example.com", path = {{ prefix = "/api" }} }}
{FIXED}
[[routes]]
name = "exact-host-longer-prefix"
match = {{ host = "a.example.com", path = {{ prefix = "/api/v2" }} }}
{FIXED}
[[routes]]
name = "exact-host-regex"
match = {{ host = "a.example.com", path = {{ regex = "^/api/v2/x" }} }}
{FIXED}
[[routes]]
name = "exact-host-exact-path"
match = {{ host = "a.example.com", path = {{ exact = "/api/v2/x" }} }}
{FIXED}
"#
        ));
        assert_eq!(find(&t, "other.org", "/"), Some("any"));
        assert_eq!(find(&t, "b.example.com", "/api"), Some("wild"));
        assert_eq!(find(&t, "example.com", "/"), Some("any"));
        assert_eq!(find(&t, "a.example.com", "/"), Some("exact-host"));
        assert_eq!(
            find(&t, "a.example.com", "/api/x"),
            Some("exact-host-prefix")
        );
        assert_eq!(find(&t, "a.example.com", "/apix"), Some("exact-host"));
        assert_eq!(
            find(&t, "a.example.com", "/api/v2/y"),
            Some("exact-host-longer-prefix")
        );
        assert_eq!(
            find(&t, "a.example.com", "/api/v2/x"),
            Some("exact-host-exact-path")
        );
        assert_eq!(
            find(&t, "a.example.com", "/api/v2/xyz"),
            Some("exact-host-longer-prefix")
        );
    }

    #[test]
    fn ties_go_to_config_order_and_methods_filter() {
        let t = table(&format!(
            r#"
[[routes]]
name = "first"
match = {{ path = {{ prefix = "/a" }}, methods = ["POST"] }}
{FIXED}
[[routes]]
name = "second"
match = {{ path = {{ prefix = "/a" }} }}
{FIXED}
[[routes]]
name = "third"
match = {{ path = {{ prefix = "/a" }} }}
{FIXED}
"#
        ));
        assert_eq!(find(&t, "h", "/a"), Some("second"));
        assert_eq!(find(&t, "h", "/b"), None);
    }

    #[test]
    fn rewrite_and_strip() {
        assert_eq!(
            rewrite_path("/api/x", Some("q=1"), Some("/api"), None),
            "/x?q=1"
        );
        assert_eq!(rewrite_path("/api", None, Some("/api"), None), "/");
        assert_eq!(rewrite_path("/api/x", None, Some("/api/"), None), "/x");
        assert_eq!(rewrite_path("/api/x", None, None, Some("/new")), "/new");
        assert_eq!(rewrite_path("/apix", None, Some("/api"), None), "/apix");
        assert_eq!(rewrite_path("/apix", None, Some("/api/"), None), "/apix");
        assert_eq!(rewrite_path("/api/", None, Some("/api/"), None), "/");
        assert_eq!(rewrite_path("/x", Some("q"), Some("/"), None), "/x?q");
    }
}
