//! Drives real `outpost` processes, for the process tests, the benchmark in `tools/` and the
//! demo: a UDP [`FaultProxy`] that cuts a link or makes it lossy, a [`Cluster`] launcher for
//! datacenters, an async [`Api`] client, and waits that poll observable state until a condition
//! holds or a deadline passes (never a guessed sleep).

mod api;
mod cluster;
mod fleet;
mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

pub use api::{Ack, Api, ApiError, Digest, Event, MessageInfo, PeerStatus, Status};
pub use cluster::{
    outpost_binary_near_current_exe, summarize, Cluster, ClusterSpec, LinkFault, NodeInfo,
    WAIT_DEFAULT,
};
pub use fleet::{Fleet, FleetSpec, WorkerSpec, JOIN_TOKEN};
pub use proxy::{FaultProxy, Mode, ModeSwitch, ProxyStats};

/// The five event types every datacenter knows.
pub const EVENT_TYPES: [&str; 5] = ["register", "call", "presence", "setting", "element"];

/// A valid event for `account`, the `n`th of a deterministic workload that cycles through all
/// five types (with removals among them: an expiring registration, a call that ends, a setting
/// set to null).
pub fn sample_event(account: &str, n: u64) -> Event {
    let data = match n % 5 {
        0 => serde_json::json!({
            "contact": format!("sip:{account}-{}@10.0.{}.{}:5060", n % 3, n % 7, n % 250),
            "expires_s": if n % 15 == 10 { 0 } else { 600 + n % 3000 },
        }),
        1 => serde_json::json!({
            "call_id": format!("call-{}", (n / 5) % 4),
            "action": if (n / 5) % 2 == 0 { "start" } else { "end" },
        }),
        2 => {
            let status = ["available", "busy", "away"][(n % 3) as usize];
            serde_json::json!({ "status": status })
        }
        3 => serde_json::json!({
            "key": format!("k{}", n % 4),
            "value": if n % 13 == 3 { serde_json::Value::Null } else { serde_json::json!(n) },
        }),
        _ => serde_json::json!({ "n": n, "tags": ["edge", format!("t{}", n % 9)] }),
    };
    Event::new(account, EVENT_TYPES[(n % 5) as usize], data)
}

/// How often a wait polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One observation of a wait's condition.
#[derive(Debug)]
pub enum Check<T> {
    /// The condition holds; the wait returns this.
    Done(T),
    /// Not yet; the text describes what was observed, and ends up in the timeout's message.
    NotYet(String),
    /// It never will (e.g. a node crashed): the wait fails at once.
    Failed(String),
}

/// Polls `check` every [`POLL_INTERVAL`] until it is done, fails, or `timeout` has passed; the
/// error says what was awaited and the last thing observed.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check<T>>,
{
    let start = Instant::now();
    let mut polls = 0u64;
    loop {
        polls += 1;
        let last = match check().await {
            Check::Done(v) => return Ok(v),
            Check::Failed(why) => {
                anyhow::bail!(
                    "waiting for {what}: failed after {:?}: {why}",
                    start.elapsed()
                )
            }
            Check::NotYet(last) => last,
        };
        if start.elapsed() >= timeout {
            anyhow::bail!(
                "timed out after {:?} ({polls} polls) waiting for {what}; last observed:\n{last}",
                start.elapsed()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_for_reports_the_last_observation() {
        let mut n = 0;
        let v = wait_for("n to reach 3", Duration::from_secs(10), || {
            n += 1;
            let seen = n;
            async move {
                if seen >= 3 {
                    Check::Done(seen)
                } else {
                    Check::NotYet(format!("n={seen}"))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let e = wait_for::<(), _, _>("never", Duration::from_millis(300), || async {
            Check::NotYet("still nothing".into())
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("never") && e.contains("still nothing"), "{e}");

        let e = wait_for::<(), _, _>("doomed", Duration::from_secs(60), || async {
            Check::Failed("crashed".into())
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("crashed"), "{e}");
    }
}
