//! Request and response transformation: headers, path rewrite and JSON body fields.
//!
//! Data in: the request (headers, path, JSON body) in the request phase, the response in the
//! response phase. Header values (and string values JSON edits add) may use `${client_ip}`,
//! `${request_id}`, `${route}` and `${upstream}`, filled from [`RequestCtx`]; `$${` is a
//! literal `${`. Another `${name}` is a config error.
//!
//! Order per phase: headers `remove`, then `set` (replace), then `add` (append); on requests
//! the path rewrite (first regex match replaced, `$1` style groups) and the JSON edits
//! (`remove`, then `rename`, then `add`, on top-level fields of a JSON object). JSON edits
//! buffer the body up to `max_body_bytes`: a larger request answers 413, a larger response is
//! passed on unchanged. Bodies that are not `application/json` (or `+json`) are not touched.

use std::collections::BTreeMap;

use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::respond::{content_length, error_response, full, read_limited, ReadError};
use super::{Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};
use crate::template::{Fill, HeaderTemplate};

/// `{ type = "transform", request_headers = { set = { "x-client" = "${client_ip}" } } }`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub request_headers: HeaderEdits,
    #[serde(default)]
    pub response_headers: HeaderEdits,
    #[serde(default)]
    pub path_rewrite: Option<PathRewrite>,
    #[serde(default)]
    pub request_json: Option<JsonEdits>,
    #[serde(default)]
    pub response_json: Option<JsonEdits>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRewrite {
    pub pattern: String,
    pub replacement: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEdits {
    /// Field → value (any TOML value; strings expand variables).
    #[serde(default)]
    pub add: BTreeMap<String, Value>,
    #[serde(default)]
    pub remove: Vec<String>,
    /// Old name → new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

/// The variables a template may use, and how each is filled from the request.
const VARIABLES: [(&str, Fill<RequestCtx>); 4] = [
    ("client_ip", |ctx, out| {
        use std::fmt::Write;
        let _ = write!(out, "{}", ctx.client_addr.ip().to_canonical());
    }),
    ("request_id", |ctx, out| out.push_str(&ctx.request_id)),
    ("route", |ctx, out| out.push_str(&ctx.route_name)),
    ("upstream", |ctx, out| out.push_str(&ctx.upstream_group)),
];

fn build_err(message: String) -> PolicyBuildError {
    PolicyBuildError {
        policy: "transform".into(),
        message,
    }
}

type Template = crate::template::Template<RequestCtx>;

/// The template of a config field, or the error naming the field and the problem.
fn checked(field: &str, template: &str) -> Result<Template, PolicyBuildError> {
    match Template::parse(template, &VARIABLES) {
        (template, None) => Ok(template),
        (_, Some(problem)) => Err(build_err(format!("{field}: {problem}"))),
    }
}

type ValueTemplate = HeaderTemplate<RequestCtx>;

/// The header template of config field `field`, header `name`.
fn value_template(
    field: &str,
    name: &str,
    template: &str,
) -> Result<ValueTemplate, PolicyBuildError> {
    let field = format!("{field}: header {name:?}");
    let parsed = checked(&field, template)?;
    HeaderTemplate::new(template, parsed).ok_or_else(|| {
        build_err(format!(
            "{field}: {template:?} is not a valid header value (control characters?)"
        ))
    })
}

/// Header edits with names and values checked once.
#[derive(Default)]
struct CompiledHeaders {
    add: Vec<(HeaderName, ValueTemplate)>,
    set: Vec<(HeaderName, ValueTemplate)>,
    remove: Vec<HeaderName>,
}

impl CompiledHeaders {
    fn compile(edits: &HeaderEdits, field: &str) -> Result<Self, PolicyBuildError> {
        let name = |n: &str| {
            HeaderName::try_from(n).map_err(|e| build_err(format!("{field}: header {n:?}: {e}")))
        };
        let pairs = |map: &BTreeMap<String, String>, op: &str| {
            map.iter()
                .map(|(k, v)| Ok((name(k)?, value_template(&format!("{field}.{op}"), k, v)?)))
                .collect::<Result<Vec<_>, PolicyBuildError>>()
        };
        Ok(Self {
            add: pairs(&edits.add, "add")?,
            set: pairs(&edits.set, "set")?,
            remove: edits
                .remove
                .iter()
                .map(|k| name(k))
                .collect::<Result<_, _>>()?,
        })
    }

    fn apply(&self, headers: &mut HeaderMap, ctx: &RequestCtx) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, template) in &self.set {
            if let Some(v) = template.value(ctx) {
                headers.insert(n.clone(), v);
            }
        }
        for (n, template) in &self.add {
            if let Some(v) = template.value(ctx) {
                headers.append(n.clone(), v);
            }
        }
    }
}

/// Checks the variables in the string values a JSON edit adds.
fn check_json_edits(field: &str, edits: Option<&JsonEdits>) -> Result<(), PolicyBuildError> {
    for (key, value) in edits.iter().flat_map(|e| &e.add) {
        if let Value::String(s) = value {
            checked(&format!("{field}.add.{key}"), s)?;
        }
    }
    Ok(())
}

/// Fills the [`VARIABLES`] in `template`; `$${` stands for a literal `${`.
pub fn expand(template: &str, ctx: &RequestCtx) -> String {
    Template::parse(template, &VARIABLES).0.fill(ctx)
}

fn expand_value(v: &Value, ctx: &RequestCtx) -> Value {
    match v {
        Value::String(s) => Value::String(expand(s, ctx)),
        other => other.clone(),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

/// Applies `edits` to a JSON object body; `None` when the body is not a JSON object.
fn edit_json(body: &[u8], edits: &JsonEdits, ctx: &RequestCtx) -> Option<Vec<u8>> {
    let Value::Object(mut obj) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    for field in &edits.remove {
        obj.remove(field);
    }
    for (old, new) in &edits.rename {
        if let Some(v) = obj.remove(old) {
            obj.insert(new.clone(), v);
        }
    }
    for (field, v) in &edits.add {
        obj.insert(field.clone(), expand_value(v, ctx));
    }
    serde_json::to_vec(&Value::Object(obj)).ok()
}

pub struct TransformPolicy {
    config: TransformConfig,
    request_headers: CompiledHeaders,
    response_headers: CompiledHeaders,
    path_rewrite: Option<(Regex, String)>,
}

impl TransformPolicy {
    pub fn build(config: TransformConfig) -> Result<Self, PolicyBuildError> {
        let path_rewrite = config
            .path_rewrite
            .as_ref()
            .map(|r| {
                Regex::new(&r.pattern)
                    .map(|re| (re, r.replacement.clone()))
                    .map_err(|e| build_err(format!("path_rewrite.pattern: {e}")))
            })
            .transpose()?;
        check_json_edits("request_json", config.request_json.as_ref())?;
        check_json_edits("response_json", config.response_json.as_ref())?;
        Ok(Self {
            request_headers: CompiledHeaders::compile(&config.request_headers, "request_headers")?,
            response_headers: CompiledHeaders::compile(
                &config.response_headers,
                "response_headers",
            )?,
            path_rewrite,
            config,
        })
    }

    fn rewrite_path(&self, uri: &http::Uri) -> Option<http::Uri> {
        let (re, replacement) = self.path_rewrite.as_ref()?;
        let path = uri.path();
        if !re.is_match(path) {
            return None;
        }
        let new_path = re.replace(path, replacement.as_str());
        let pq = match uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path.into_owned(),
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(pq.parse().ok()?);
        http::Uri::from_parts(parts).ok()
    }
}

impl Policy for TransformPolicy {
    fn name(&self) -> &'static str {
        "transform"
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let (mut parts, body) = req.into_parts();
        self.request_headers.apply(&mut parts.headers, ctx);
        if let Some(uri) = self.rewrite_path(&parts.uri) {
            parts.uri = uri;
        }
        let Some(edits) = self
            .config
            .request_json
            .as_ref()
            .filter(|_| is_json(&parts.headers))
        else {
            return RequestOutcome::Continue(Request::from_parts(parts, body));
        };
        let bytes = match read_limited(body, self.config.max_body_bytes).await {
            Ok(b) => b,
            Err(ReadError::TooLarge { .. }) => {
                return RequestOutcome::Respond(error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large to transform",
                ))
            }
            Err(ReadError::Body(e)) => {
                tracing::debug!(error = %e, "transform: request body failed");
                return RequestOutcome::Respond(error_response(
                    StatusCode::BAD_REQUEST,
                    "request body could not be read",
                ));
            }
        };
        let out = edit_json(&bytes, edits, ctx).map_or(bytes, Into::into);
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        RequestOutcome::Continue(Request::from_parts(parts, full(out)))
    }

    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        self.response_headers.apply(&mut parts.headers, ctx);
        let encoded = parts.headers.contains_key(header::CONTENT_ENCODING);
        let Some(edits) = self
            .config
            .response_json
            .as_ref()
            .filter(|_| is_json(&parts.headers) && !encoded)
        else {
            return Response::from_parts(parts, body);
        };
        // No body, but a length: the answer to HEAD (or a 304), whose Content-Length is the
        // length of the body a GET would get, before the edits. The edited length is not known
        // without that body, so none is sent (RFC 9110 8.6 allows leaving it out), rather than
        // the 0 of the empty body.
        if http_body::Body::is_end_stream(&body) {
            if content_length(&parts.headers).is_some_and(|n| n > 0) {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            return Response::from_parts(parts, body);
        }
        let bytes = match read_limited(body, self.config.max_body_bytes).await {
            Ok(b) => b,
            Err(ReadError::TooLarge { body }) => return Response::from_parts(parts, body),
            Err(ReadError::Body(e)) => {
                tracing::debug!(error = %e, "transform: response body failed");
                return error_response(StatusCode::BAD_GATEWAY, "upstream body failed");
            }
        };
        let out = edit_json(&bytes, edits, ctx).map_or(bytes, Into::into);
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        Response::from_parts(parts, full(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestCtx {
        RequestCtx::new(
            "[::ffff:192.0.2.7]:4000".parse().unwrap(),
            "req-1".into(),
            "users".into(),
            "api".into(),
            false,
            std::time::Instant::now(),
        )
    }

    #[test]
    fn expands_variables() {
        assert_eq!(
            expand("${client_ip}/${request_id}/${route}", &ctx()),
            "192.0.2.7/req-1/users"
        );
        assert_eq!(
            expand("Hello $${name}, ${upstream} costs $5 ${route", &ctx()),
            "Hello ${name}, api costs $5 ${route"
        );
        // An escaped `${` is no variable for the config check either.
        let cfg: TransformConfig =
            toml::from_str("request_headers = { set = { x-t = \"Hello $${name}\" } }").unwrap();
        assert!(TransformPolicy::build(cfg).is_ok());
    }

    #[test]
    fn json_edits_remove_rename_add() {
        let edits = JsonEdits {
            add: BTreeMap::from([("via".into(), Value::String("${route}".into()))]),
            remove: vec!["password".into()],
            rename: BTreeMap::from([("user".into(), "username".into())]),
        };
        let out = edit_json(br#"{"user":"a","password":"x","n":1}"#, &edits, &ctx()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"username":"a","n":1,"via":"users"}));
        assert!(edit_json(b"[1]", &edits, &ctx()).is_none());
    }

    fn build_error(toml_text: &str) -> String {
        let cfg: TransformConfig = toml::from_str(toml_text).unwrap();
        match TransformPolicy::build(cfg) {
            Ok(_) => panic!("{toml_text} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn templates_are_checked_when_built() {
        let err = build_error("request_headers = { set = { x-ip = \"${clientip}\" } }");
        assert!(
            err.contains("request_headers.set: header \"x-ip\": unknown variable ${clientip}"),
            "{err}"
        );
        assert!(
            err.contains("known: ${client_ip}, ${request_id}, ${route}, ${upstream}"),
            "{err}"
        );
        let err = build_error("response_headers = { add = { x-r = \"a ${route\" } }");
        assert!(
            err.contains("response_headers.add: header \"x-r\": \"a ${route\" opens a variable"),
            "{err}"
        );
        let err = build_error("response_headers = { add = { x-r = \"a\\nb\" } }");
        assert!(err.contains("is not a valid header value"), "{err}");
        let err = build_error("response_json = { add = { via = \"${rout}\" } }");
        assert!(
            err.contains("response_json.add.via: unknown variable ${rout}"),
            "{err}"
        );

        let cfg: TransformConfig = toml::from_str(
            "response_headers = { set = { x-fixed = \"1\", x-route = \"${route}:${upstream}\", x-esc = \"$${name} ${route}\", x-lit = \"$${name}\" } }",
        )
        .unwrap();
        let p = TransformPolicy::build(cfg).unwrap();
        let mut headers = HeaderMap::new();
        p.response_headers.apply(&mut headers, &ctx());
        assert_eq!(headers["x-fixed"], "1");
        assert_eq!(headers["x-route"], "users:api");
        assert_eq!(headers["x-esc"], "${name} users");
        assert_eq!(headers["x-lit"], "${name}");
    }

    #[test]
    fn path_rewrite_keeps_query() {
        let cfg: TransformConfig = toml::from_str(
            "path_rewrite = { pattern = \"^/api/(.*)$\", replacement = \"/internal/$1\" }",
        )
        .unwrap();
        let p = TransformPolicy::build(cfg).unwrap();
        let uri: http::Uri = "/api/users?x=1".parse().unwrap();
        assert_eq!(p.rewrite_path(&uri).unwrap(), "/internal/users?x=1");
    }
}
