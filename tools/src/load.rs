//! Closed-loop load: N client tasks per node, each posting one request after the other (single
//! events or batches) until a deadline, on one shared connection-pooling HTTP client.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

/// Accounts the load is spread over, unless a run says otherwise (`Spec::accounts`).
pub const ACCOUNTS: u64 = 10_000;
/// Error messages kept per run (the rest are only counted).
const ERRORS_KEPT: usize = 8;

/// One node to send to.
#[derive(Clone, Debug)]
pub struct Target {
    /// Index of the node in the cluster.
    pub node: usize,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub token: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/events`, one event per request.
    Single,
    /// `POST /v1/events/batch` with this many events per request.
    Batch(usize),
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub targets: Vec<Target>,
    pub clients_per_target: usize,
    pub kind: Kind,
    /// Requests sent before this are not counted (connections, caches).
    pub warmup: Duration,
    /// Counted window after the warm-up; clients send no new request after it.
    pub duration: Duration,
    /// Keep the message id of about one acknowledged event in this many (0: none).
    pub sample_every: u64,
    /// Accounts the events are spread over (uniformly at random).
    pub accounts: u64,
}

/// A message id kept for the replication latency, with the node it was posted to.
#[derive(Clone, Debug)]
pub struct Sample {
    pub node: usize,
    pub message_id: String,
    /// Where the message is stored (`origin`, `oseq` from the answer), for a direct lookup.
    pub locator: Option<(String, u64)>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Events acknowledged for requests sent inside the counted window.
    pub events: u64,
    pub requests: u64,
    /// Events acknowledged in total, warm-up and window (what the nodes hold).
    pub events_all: u64,
    pub errors: u64,
    pub error_examples: Vec<String>,
    /// Client-side latency of each counted request (send to full answer), microseconds.
    pub latencies_us: Vec<u32>,
    /// From the end of the warm-up to the last counted answer.
    pub window: Duration,
    pub samples: Vec<Sample>,
    /// When the last answer arrived.
    pub finished: Option<Instant>,
}

impl Outcome {
    pub fn events_per_sec(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 {
            self.events as f64 / s
        } else {
            0.0
        }
    }
}

#[derive(Default)]
struct TaskOut {
    events: u64,
    requests: u64,
    events_all: u64,
    errors: u64,
    error_examples: Vec<String>,
    latencies_us: Vec<u32>,
    last_done: Option<Instant>,
    samples: Vec<Sample>,
}

/// The shared HTTP client: pooled keep-alive connections, enough idle ones for every task.
pub fn client(max_clients: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_clients.max(8))
        .tcp_nodelay(true)
        .no_proxy()
        .http1_only()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .build()
        .expect("a plain HTTP client builds")
}

/// A small xorshift generator per task: accounts and values without a shared lock.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value; 0 is made odd so the sequence does not stick at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// One event as JSON: three in four are `presence`, one in four `register` (bounded contacts).
pub fn push_event(out: &mut String, rng: &mut Rng, n: u64, accounts: u64) {
    let r = rng.next();
    let account = r % accounts.max(1);
    if r % 4 == 3 {
        let _ = write!(
            out,
            r#"{{"account":"acct-{account}","type":"register","data":{{"contact":"sip:u{account}@10.0.0.{}","expires_s":3600}}}}"#,
            (r >> 20) % 4
        );
    } else {
        let _ = write!(
            out,
            r#"{{"account":"acct-{account}","type":"presence","data":{{"status":"s{n}"}}}}"#
        );
    }
}

#[derive(Deserialize)]
struct IdOnly {
    message_id: String,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    oseq: Option<u64>,
}

impl IdOnly {
    fn sample(self, node: usize) -> Sample {
        let locator = self.origin.zip(self.oseq);
        Sample {
            node,
            message_id: self.message_id,
            locator,
        }
    }
}

/// Runs the load and gathers what every task saw.
pub async fn run(http: &reqwest::Client, spec: &Spec) -> Outcome {
    let start = Instant::now();
    let measure_start = start + spec.warmup;
    let deadline = measure_start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for t in &spec.targets {
        let (path, per) = match spec.kind {
            Kind::Single => ("/v1/events", 1usize),
            Kind::Batch(n) => ("/v1/events/batch", n),
        };
        let url: Arc<str> = format!("{}{path}", t.base).into();
        let auth = HeaderValue::from_str(&format!("Bearer {}", t.token)).expect("token is ASCII");
        for c in 0..spec.clients_per_target {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut rng = Rng(seed | 1);
            let http = http.clone();
            let url = url.clone();
            let auth = auth.clone();
            let node = t.node;
            let kind = spec.kind;
            let sample_every = spec.sample_every;
            let accounts = spec.accounts;
            tasks.spawn(async move {
                let mut out = TaskOut::default();
                let mut n: u64 = c as u64 * 1_000_000_000;
                let mut since_sample: u64 = (c as u64 * 7919) % sample_every.max(1);
                let mut body = String::with_capacity(per * 110 + 2);
                loop {
                    let sent = Instant::now();
                    if sent >= deadline {
                        break;
                    }
                    body.clear();
                    if kind == Kind::Single {
                        push_event(&mut body, &mut rng, n, accounts);
                        n += 1;
                    } else {
                        body.push('[');
                        for i in 0..per {
                            if i > 0 {
                                body.push(',');
                            }
                            push_event(&mut body, &mut rng, n, accounts);
                            n += 1;
                        }
                        body.push(']');
                    }
                    let res = http
                        .post(&*url)
                        .header(AUTHORIZATION, auth.clone())
                        .header(CONTENT_TYPE, "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    let answer = match res {
                        Ok(resp) => {
                            let status = resp.status();
                            match resp.bytes().await {
                                Ok(b) if status.is_success() => Ok(b),
                                Ok(b) => Err(format!(
                                    "HTTP {status}: {}",
                                    String::from_utf8_lossy(&b)
                                        .chars()
                                        .take(300)
                                        .collect::<String>()
                                )),
                                Err(e) => Err(chain(&e)),
                            }
                        }
                        Err(e) => Err(chain(&e)),
                    };
                    let done = Instant::now();
                    match answer {
                        Ok(bytes) => {
                            out.events_all += per as u64;
                            if sent >= measure_start {
                                out.events += per as u64;
                                out.requests += 1;
                                out.latencies_us.push(
                                    done.duration_since(sent).as_micros().min(u32::MAX as u128)
                                        as u32,
                                );
                                out.last_done = Some(done);
                            }
                            if sample_every > 0 {
                                since_sample += per as u64;
                                if since_sample >= sample_every {
                                    since_sample %= sample_every;
                                    sample_ids(&bytes, kind, node, &mut out.samples);
                                }
                            }
                        }
                        Err(e) => {
                            out.errors += 1;
                            if out.error_examples.len() < ERRORS_KEPT {
                                out.error_examples.push(e);
                            }
                            // Do not spin on a node that refuses.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                out
            });
        }
    }
    let mut o = Outcome::default();
    let mut last = measure_start;
    while let Some(r) = tasks.join_next().await {
        let t = r.expect("a load task panicked");
        o.events += t.events;
        o.requests += t.requests;
        o.events_all += t.events_all;
        o.errors += t.errors;
        for e in t.error_examples {
            if o.error_examples.len() < ERRORS_KEPT {
                o.error_examples.push(e);
            }
        }
        o.latencies_us.extend(t.latencies_us);
        o.samples.extend(t.samples);
        if let Some(d) = t.last_done {
            last = last.max(d);
        }
    }
    o.finished = Some(Instant::now());
    o.window = last.duration_since(measure_start);
    o.latencies_us.sort_unstable();
    o
}

/// Keeps one message id from an answer (for a batch: the last event's, the one committed last).
fn sample_ids(bytes: &[u8], kind: Kind, node: usize, samples: &mut Vec<Sample>) {
    match kind {
        Kind::Single => {
            if let Ok(a) = serde_json::from_slice::<IdOnly>(bytes) {
                samples.push(a.sample(node));
            }
        }
        Kind::Batch(_) => {
            if let Ok(v) = serde_json::from_slice::<Vec<IdOnly>>(bytes) {
                if let Some(a) = v.into_iter().last() {
                    samples.push(a.sample(node));
                }
            }
        }
    }
}

fn chain(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The value at quantile `q` (0..=1) of sorted values.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_json() {
        let mut rng = Rng(12345);
        for n in 0..100 {
            let mut s = String::new();
            push_event(&mut s, &mut rng, n, ACCOUNTS);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert!(v["account"].as_str().unwrap().starts_with("acct-"));
        }
    }

    #[test]
    fn quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(51));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile::<u32>(&[], 0.5), None);
    }
}
