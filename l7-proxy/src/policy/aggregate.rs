//! Aggregation: answers a request by calling several upstream URLs concurrently and combining
//! their JSON bodies into one object.
//!
//! Calls go to `https://` URLs (the server verified against the system's CAs, or those of
//! `ca_file`) or `http://` ones.
//!
//! Data in: the client request supplies only the headers listed in `forward_headers` (for
//! example `authorization`; after a `jwt` policy, which removes it once verified, that needs
//! the jwt's `forward_token = true`, and the chain is refused without it) and, when `forward_query` is set, its query string, appended to
//! each call's URL. Each call is a GET with its own timeout; a call fails on connection error,
//! timeout, non-2xx status, a body over `max_body_bytes` or a body that is not JSON. A
//! success without content (204, or an empty 200) counts as `null`.
//!
//! Data out: this policy always answers (the route's upstream is never called):
//! `{ "<key>": <body>, ... }`. With `on_error = "fail"` any failure answers 502 naming the
//! failed calls; with `"partial"` failed keys are `null`, listed in `X-Aggregate-Errors` and
//! described under `_errors`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::respond::json_response;
use super::{Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "aggregate", calls = [{ key = "user", url = "http://10.0.0.5/user", timeout_ms = 500 }] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    pub calls: Vec<AggregateCall>,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub forward_headers: Vec<String>,
    #[serde(default)]
    pub forward_query: bool,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// PEM file of the CA certificates that `https://` calls' servers are verified against;
    /// by default the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    pub key: String,
    /// `https://` or `http://` URL.
    pub url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Fail,
    Partial,
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_timeout_ms() -> u64 {
    2_000
}

pub struct AggregatePolicy {
    config: AggregateConfig,
    urls: Vec<Uri>,
    forward_headers: Vec<HeaderName>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl AggregatePolicy {
    pub fn build(config: AggregateConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "aggregate".into(),
            message,
        };
        if config.calls.is_empty() {
            return Err(err("calls must not be empty".into()));
        }
        let mut keys = std::collections::HashSet::new();
        for (i, call) in config.calls.iter().enumerate() {
            if !keys.insert(call.key.as_str()) {
                return Err(err(format!(
                    "calls[{i}].key: {:?} is used by an earlier call; each call needs its \
                     own key in the combined object",
                    call.key
                )));
            }
            if call.timeout_ms == 0 {
                return Err(err(format!(
                    "calls[{i}].timeout_ms must be at least 1: 0 would fail the call at once"
                )));
            }
        }
        let urls: Vec<Uri> = config
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let uri: Uri = c
                    .url
                    .parse()
                    .map_err(|e| err(format!("calls[{i}].url: {e}")))?;
                if !super::fetchable(&uri) {
                    return Err(err(format!(
                        "calls[{i}].url: {:?} is not an https:// or http:// URL with a host",
                        c.url
                    )));
                }
                Ok(uri)
            })
            .collect::<Result<_, _>>()?;
        let forward_headers = config
            .forward_headers
            .iter()
            .map(|h| {
                HeaderName::try_from(h.as_str()).map_err(|e| err(format!("forward_headers: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let https = urls.iter().any(|u| u.scheme_str() == Some("https"));
        if config.ca_file.is_some() && !https {
            return Err(err(
                "ca_file verifies https:// calls; every call here is http://".into(),
            ));
        }
        let connector = crate::tls::policy_connector(https, config.ca_file.as_deref())
            .map_err(|e| err(format!("ca_file: {e}")))?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            config,
            urls,
            forward_headers,
            client,
        })
    }

    async fn call(
        &self,
        i: usize,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Value, String> {
        let call = &self.config.calls[i];
        let uri = match query.filter(|_| self.config.forward_query) {
            Some(q) => {
                let sep = if self.urls[i].query().is_some() {
                    '&'
                } else {
                    '?'
                };
                format!("{}{sep}{q}", self.urls[i])
                    .parse()
                    .map_err(|e| format!("url: {e}"))?
            }
            None => self.urls[i].clone(),
        };
        let mut req = Request::get(uri)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        for name in &self.forward_headers {
            for v in headers.get_all(name) {
                req.headers_mut().append(name.clone(), v.clone());
            }
        }
        let fetch = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::policy::error_chain(&e))?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status().as_u16()));
            }
            let body = Limited::new(resp.into_body(), self.config.max_body_bytes)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            // A success without content (204, or an empty 200) is the call's `null`.
            if body.is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_slice::<Value>(&body).map_err(|e| format!("invalid JSON: {e}"))
        };
        tokio::time::timeout(Duration::from_millis(call.timeout_ms), fetch)
            .await
            .map_err(|_| format!("timed out after {} ms", call.timeout_ms))?
    }
}

impl Policy for AggregatePolicy {
    fn name(&self) -> &'static str {
        "aggregate"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let query = req.uri().query();
        let results = Box::pin(join_all(
            (0..self.urls.len()).map(|i| self.call(i, req.headers(), query)),
        ))
        .await;
        let mut combined = Map::new();
        let mut errors = Map::new();
        for (call, result) in self.config.calls.iter().zip(results) {
            match result {
                Ok(v) => {
                    combined.insert(call.key.clone(), v);
                }
                Err(e) => {
                    tracing::debug!(request_id = %ctx.request_id, key = call.key, error = %e, "aggregate: call failed");
                    combined.insert(call.key.clone(), Value::Null);
                    errors.insert(call.key.clone(), Value::String(e));
                }
            }
        }
        if errors.is_empty() {
            return RequestOutcome::Respond(json_response(
                StatusCode::OK,
                &Value::Object(combined),
            ));
        }
        let failed = errors.keys().cloned().collect::<Vec<_>>().join(",");
        let mut resp = if self.config.on_error == OnError::Fail {
            json_response(
                StatusCode::BAD_GATEWAY,
                &serde_json::json!({ "error": "aggregate call failed", "failed": errors }),
            )
        } else {
            combined.insert("_errors".into(), Value::Object(errors));
            json_response(StatusCode::OK, &Value::Object(combined))
        };
        if let Ok(v) = HeaderValue::try_from(failed) {
            resp.headers_mut().insert("x-aggregate-errors", v);
        }
        RequestOutcome::Respond(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_other_schemes_and_empty_calls() {
        let cfg: AggregateConfig = toml::from_str("calls = []").unwrap();
        assert!(AggregatePolicy::build(cfg).is_err());
        let cfg: AggregateConfig =
            toml::from_str("calls = [{ key = \"a\", url = \"ws://x/\" }]").unwrap();
        assert!(AggregatePolicy::build(cfg).is_err());
        let cfg: AggregateConfig =
            toml::from_str("calls = [{ key = \"a\", url = \"https://x/\" }]").unwrap();
        assert!(AggregatePolicy::build(cfg).is_ok());
    }
}
