//! `/metrics` of a real node, read by a Prometheus text-format parser (`prometheus-parse`),
//! with every line required to be a comment, a TYPE/HELP line or a well-formed sample (that
//! parser skips lines it cannot read, so the test looks for those itself): the names of the
//! interface are there, typed as they should be, and the counters move with traffic.

mod metrics_support;
mod ops_support;

use metrics_support::{assert_promtool_clean, sample};
use ops_support::{test_dir, Node};
use outpost::testkit::{sample_event, Api};
use prometheus_parse::{LineInfo, Scrape, Value};

struct Metrics(Scrape);

impl Metrics {
    async fn scrape(api: &Api) -> Metrics {
        Metrics::parse(&api.metrics().await.expect("GET /metrics"))
    }

    fn parse(text: &str) -> Metrics {
        for line in text.lines() {
            assert!(
                !matches!(LineInfo::parse(line), LineInfo::Ignored),
                "not Prometheus text format: {line:?}"
            );
        }
        let scrape =
            Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses as Prometheus");
        Metrics(scrape)
    }

    fn value(&self, name: &str) -> &Value {
        &self
            .0
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no sample {name}"))
            .value
    }

    fn counter(&self, name: &str) -> f64 {
        match self.value(name) {
            Value::Counter(v) => *v,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.value(name) {
            Value::Gauge(v) => *v,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    /// The `+Inf` bucket of a histogram: how many observations.
    fn histogram_count(&self, name: &str) -> f64 {
        match self.value(name) {
            Value::Histogram(buckets) => {
                for w in buckets.windows(2) {
                    assert!(w[0].less_than < w[1].less_than && w[0].count <= w[1].count);
                }
                buckets.last().expect("buckets").count
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_counters_move_with_traffic() {
    let dir = test_dir("ops-metrics");
    let mut node = Node::init(&dir, "dc-metrics", "[limits]\ningest_queue_max = 1000\n");
    node.start(&[]);
    let (base, token) = node.api();
    let api = Api::new(&base, &token);

    let before = Metrics::scrape(&api).await;
    for name in [
        "outpost_events_ingested_total",
        "outpost_elements_applied_total",
        "outpost_copies_received_total",
    ] {
        assert_eq!(before.counter(name), 0.0, "{name} on a fresh node");
    }
    assert_eq!(before.gauge("outpost_writer_queue_max"), 1000.0);
    assert_eq!(before.gauge("outpost_ready"), 1.0);
    assert_eq!(before.gauge("outpost_peers"), 0.0);
    let commits_seen = before.histogram_count("outpost_commit_seconds");

    const N: u64 = 137;
    let events: Vec<_> = (0..N)
        .map(|n| sample_event(&format!("m{}", n % 13), n))
        .collect();
    for chunk in events.chunks(50) {
        api.post_batch(chunk).await.expect("batch acknowledged");
    }
    let bad = api
        .post_event("m0", "no-such-type", serde_json::json!({}))
        .await;
    assert!(bad.is_err(), "an unknown type is refused");
    let unauthorized = Api::new(&base, "wrong-token").digest().await;
    assert!(unauthorized.is_err());

    let after = Metrics::scrape(&api).await;
    assert_eq!(
        after.counter("outpost_events_ingested_total")
            - before.counter("outpost_events_ingested_total"),
        N as f64
    );
    // 3 batches in at most 3 commits (and perhaps a periodic trim beside them).
    let commits = after.counter("outpost_commits_total") - before.counter("outpost_commits_total");
    assert!((1.0..=4.0).contains(&commits), "{commits} commits");
    assert_eq!(
        after.histogram_count("outpost_commit_seconds") - commits_seen,
        commits
    );
    assert_eq!(after.counter("outpost_api_unauthorized_total"), 1.0);
    assert_eq!(after.gauge("outpost_log_tail"), N as f64);
    assert_eq!(after.gauge("outpost_log_records"), N as f64);
    let digest = api.digest().await.unwrap();
    assert_eq!(after.gauge("outpost_entries"), digest.entries as f64);
    assert_eq!(
        after.counter("outpost_elements_applied_total"),
        0.0,
        "no peers"
    );

    // The text passes Prometheus's own linter, and carries what operators graph first.
    let text = api.metrics().await.unwrap();
    assert_promtool_clean("datacenter", &text);
    let m = Metrics::parse(&text);
    assert!(m.gauge("process_resident_memory_bytes") > 0.0);
    assert!(m.gauge("process_open_fds") > 0.0);
    assert!(m.gauge("process_start_time_seconds") > 1.0e9);
    assert!(m.counter("process_cpu_seconds_total") >= 0.0);
    // The file only grows here (no compaction): what the scrape saw is at most its size now.
    let db = std::fs::metadata(node.data_dir.join("outpost.redb"))
        .unwrap()
        .len() as f64;
    let shown = m.gauge("outpost_db_bytes");
    assert!(
        shown > 0.0 && shown <= db,
        "outpost_db_bytes {shown}, file {db}"
    );
    assert_eq!(
        sample(
            &text,
            "outpost_http_requests_total",
            &[("route", "/v1/events/batch"), ("status", "200")]
        ),
        Some(3.0),
        "requests by route template and status"
    );
    assert_eq!(
        sample(
            &text,
            "outpost_http_requests_total",
            &[("route", "/v1/digest"), ("status", "401")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "outpost_http_request_duration_seconds_count",
            &[("route", "/v1/events/batch")]
        ) == Some(3.0)
    );
    assert_eq!(
        m.histogram_count("outpost_replication_latency_seconds"),
        0.0,
        "no peers"
    );

    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
