//! The admin listener: `GET /metrics` (Prometheus text), `POST /-/reload` (re-read the config
//! file and apply it, like SIGHUP) and `GET /-/healthy`. Plain HTTP/1.1; bind it to a private
//! address.

use std::convert::Infallible;
use std::sync::Weak;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::pipeline::text_response;
use crate::policy::ProxyBody;
use crate::proxy::ProxyInner;

/// Serves the admin API until the proxy is dropped or the task aborted.
pub async fn serve(listener: TcpListener, proxy: Weak<ProxyInner>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(route(req, proxy).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, proxy: Weak<ProxyInner>) -> Response<ProxyBody> {
    let Some(proxy) = proxy.upgrade() else {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let state = proxy.shared.state.load();
            for group in state.groups.values() {
                for member in &group.members {
                    member.publish_health(&proxy.shared.metrics);
                }
            }
            let mut resp = text_response(StatusCode::OK, proxy.shared.metrics.encode());
            if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            resp
        }
        (&Method::POST, "/-/reload") => match proxy.reload_from_file().await {
            Ok(generation) => text_response(
                StatusCode::OK,
                format!("reloaded: generation {generation}\n"),
            ),
            Err(e) => text_response(StatusCode::BAD_REQUEST, format!("reload failed: {e}\n")),
        },
        (&Method::GET, "/-/healthy") => text_response(StatusCode::OK, "ok\n".into()),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
