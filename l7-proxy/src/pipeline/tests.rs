//! The pipeline with policies the config cannot express yet: short-circuits, response phases
//! over the policies that ran, and a policy that re-targets the upstream group.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use super::{run_phases, text_response, ConnInfo, Trace};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::{
    AnyPolicy, PhaseState, Policy, PolicyChain, ProxyBody, RequestCtx, RequestOutcome,
};
use crate::state::RuntimeState;
use crate::upstream::client::ClientCache;

type Log = Arc<Mutex<Vec<String>>>;

enum Act {
    Continue,
    Respond(StatusCode),
    SetGroup(&'static str),
}

struct Recorder {
    name: &'static str,
    act: Act,
    log: Log,
}

impl Policy for Recorder {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        self.log.lock().unwrap().push(format!("req:{}", self.name));
        // Each policy's state comes back to its own response phase.
        ctx.set_state(PhaseState::Custom(Box::new(self.name)));
        match &self.act {
            Act::Continue => RequestOutcome::Continue(req),
            Act::Respond(status) => RequestOutcome::Respond(text_response(*status, String::new())),
            Act::SetGroup(group) => {
                ctx.upstream_group = group.to_string();
                RequestOutcome::Continue(req)
            }
        }
    }

    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let own_state = match ctx.take_state() {
            PhaseState::Custom(state) => state.downcast_ref::<&str>() == Some(&self.name),
            _ => false,
        };
        let entry = if own_state {
            format!("resp:{}", self.name)
        } else {
            format!("resp:{} without its state", self.name)
        };
        self.log.lock().unwrap().push(entry);
        resp
    }
}

fn chain(log: &Log, acts: Vec<(&'static str, Act)>) -> PolicyChain {
    PolicyChain::new(
        acts.into_iter()
            .map(|(name, act)| {
                AnyPolicy::Dyn(Arc::new(Recorder {
                    name,
                    act,
                    log: log.clone(),
                }))
            })
            .collect(),
    )
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn run(state: &RuntimeState, host: &str) -> (Response<ProxyBody>, Trace) {
    let conn = ConnInfo {
        client_addr: "192.0.2.1:5000".parse().unwrap(),
        tls: false,
        framing: None,
        busy: None,
        forwarding: Arc::new(super::headers::ForwardingValues::new(
            "192.0.2.1:5000".parse().unwrap(),
            false,
        )),
        tunnels: None,
    };
    let req = Request::get("/x")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut trace = Trace::default();
    let resp = run_phases(
        state,
        &Metrics::new(),
        &conn,
        req,
        host,
        std::time::Instant::now(),
        &mut trace,
    )
    .await;
    (resp, trace)
}

async fn state(a: SocketAddr, b: SocketAddr) -> RuntimeState {
    let text = format!(
        r#"
[[upstreams]]
name = "a"
members = [{{ address = "{a}" }}]
[[upstreams]]
name = "b"
members = [{{ address = "{b}" }}]
[[routes]]
name = "fixed"
match = {{ host = "fixed" }}
action = {{ fixed = {{ status = 200, body = "fixed" }} }}
[[routes]]
name = "fwd"
match = {{ host = "fwd" }}
action = {{ forward = {{ group = "a" }} }}
"#
    );
    let config = Config::from_toml_str(&text).unwrap();
    RuntimeState::build(
        &config,
        1,
        None,
        &ClientCache::default(),
        &Arc::new(Metrics::new()),
    )
    .unwrap()
}

#[tokio::test]
async fn policies_run_in_order_and_responses_in_reverse() {
    let mut state = state(dead_addr(), dead_addr()).await;
    let log = Log::default();
    state.routes.set_policies(
        "fixed",
        chain(&log, vec![("p1", Act::Continue), ("p2", Act::Continue)]),
    );
    let (resp, _) = run(&state, "fixed").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        *log.lock().unwrap(),
        ["req:p1", "req:p2", "resp:p2", "resp:p1"]
    );
}

#[tokio::test]
async fn a_responding_policy_short_circuits_and_only_earlier_ones_see_the_response() {
    let (a, b) = (dead_addr(), dead_addr());
    let mut state = state(a, b).await;
    let log = Log::default();
    state.routes.set_policies(
        "fwd",
        chain(
            &log,
            vec![
                ("p1", Act::Continue),
                ("deny", Act::Respond(StatusCode::FORBIDDEN)),
                ("p3", Act::Continue),
            ],
        ),
    );
    let (resp, trace) = run(&state, "fwd").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(trace.upstream, None, "the upstream was never called");
    assert_eq!(*log.lock().unwrap(), ["req:p1", "req:deny", "resp:p1"]);
}

#[tokio::test]
async fn a_policy_can_send_the_request_to_another_group() {
    let (a, b) = (dead_addr(), dead_addr());
    let mut state = state(a, b).await;
    let log = Log::default();
    state
        .routes
        .set_policies("fwd", chain(&log, vec![("canary", Act::SetGroup("b"))]));
    let (resp, trace) = run(&state, "fwd").await;
    // Nothing listens there, so 502 — but it was group b's member that was tried.
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(trace.upstream, Some(b));
    assert_eq!(*log.lock().unwrap(), ["req:canary", "resp:canary"]);
    // The trace holds the route; set_policies changes routes nothing else holds.
    drop(trace);

    state
        .routes
        .set_policies("fwd", chain(&log, vec![("typo", Act::SetGroup("nope"))]));
    log.lock().unwrap().clear();
    let (resp, _) = run(&state, "fwd").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(*log.lock().unwrap(), ["req:typo", "resp:typo"]);
}
