//! Active health checks: one task per member sends `GET <path>` every interval. A member goes
//! down after `fall` consecutive failures (no answer within the timeout, or a status outside
//! 200..=399) and comes back after `rise` consecutive successes.
//!
//! The tasks are owned by the config generation's [`HealthTasks`], which aborts them when the
//! generation is dropped after a reload.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;

use super::UpstreamGroup;
use crate::config::HealthCheckConfig;
use crate::metrics::Metrics;

/// Aborts the health check tasks of a generation when dropped.
#[derive(Default)]
pub struct HealthTasks(Vec<JoinHandle<()>>);

impl Drop for HealthTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl HealthTasks {
    /// Starts checks for every member of `group`.
    pub fn spawn(
        &mut self,
        group: &UpstreamGroup,
        config: &HealthCheckConfig,
        metrics: &Arc<Metrics>,
    ) {
        for (index, member) in group.members.iter().enumerate() {
            let member = member.clone();
            let client = group.client_for(index).clone();
            let scheme = group.scheme.clone();
            let config = config.clone();
            let metrics = metrics.clone();
            self.0.push(tokio::spawn(async move {
                let uri: Option<Uri> = format!("{scheme}://{}{}", member.addr, config.path).parse().ok();
                let Some(uri) = uri else { return };
                let mut ticker = tokio::time::interval(Duration::from_millis(config.interval_ms.clamp(10, 86_400_000)));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut successes, mut failures) = (0u32, 0u32);
                loop {
                    ticker.tick().await;
                    let req = Request::get(uri.clone())
                        .header(http::header::USER_AGENT, "l7-proxy-health-check")
                        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed());
                    let Ok(req) = req else { return };
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_millis(*config.timeout_ms.get_ref()), client.request(member.addr, &member.authority, req)).await,
                        Ok(Ok(resp)) if (200..400).contains(&resp.status().as_u16())
                    );
                    if ok {
                        successes += 1;
                        failures = 0;
                        if successes >= config.rise {
                            member.set_active_up(true, &metrics);
                        }
                    } else {
                        failures += 1;
                        successes = 0;
                        if failures >= config.fall {
                            member.set_active_up(false, &metrics);
                        }
                    }
                }
            }));
        }
    }
}
