//! The HTTP API under hostile clients (issue 9.5): idle connections past the cap, slow heads,
//! trickled bodies and oversized bodies are dropped or refused within their named bounds, while
//! a good client is still served; every refusal is JSON. In-process datacenters on 127.0.0.1,
//! small configured bounds, waits on observable state.

use std::time::{Duration, Instant};

use outpost::config::Config;
use outpost::datacenter;
use outpost::testkit::{wait_for, Check};
use outpost::wire::Role;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: every wait ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start(
    label: &str,
    set: impl FnOnce(&mut Config),
) -> (datacenter::Running, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("outpost-{label}-{}", rand::random::<u64>()));
    outpost::roles::init(&dir, Role::Datacenter, Some("dc")).unwrap();
    let mut c = Config::with_defaults(Role::Datacenter, "dc", &dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    set(&mut c);
    (datacenter::start(c).await.unwrap(), dir)
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Result<String, String> {
    let mut out = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut out)).await {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => Err(format!(
            "still open after {limit:?}; got {:?}",
            String::from_utf8_lossy(&out)
        )),
    }
}

fn body_json(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_cap_never_lock_out_an_authenticated_client() {
    const CAP: usize = 64;
    const EXTRA: usize = 300;
    let (n, dir) = start("api-cap", |c| c.limits.api_connections_max = CAP).await;
    let addr = n.api_addr;
    let mut idle = Vec::with_capacity(CAP + EXTRA);
    for _ in 0..CAP + EXTRA {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // The server holds at most CAP of them: it closed the oldest to make room for the others.
    let closed = wait_for(
        "the server closes idle connections past the cap",
        DEADLINE,
        || {
            let mut closed = 0;
            let mut buf = [0u8; 1];
            for s in &idle {
                if matches!(s.try_read(&mut buf), Ok(0)) {
                    closed += 1;
                }
            }
            async move {
                if closed >= EXTRA {
                    Check::Done(closed)
                } else {
                    Check::NotYet(format!("{closed} closed"))
                }
            }
        },
    )
    .await
    .unwrap();
    assert!(closed <= EXTRA + 1, "{closed} closed: more than needed");
    let http = &n.shared.metrics.http;
    assert!(http.connections.get() as usize <= CAP);
    // A real client still gets in, and is answered.
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/status"))
        .bearer_auth(&n.shared.token)
        .timeout(DEADLINE)
        .send()
        .await
        .expect("an authenticated GET is answered while the cap is full of idle connections");
    assert_eq!(resp.status().as_u16(), 200);
    let status: Value = resp.json().await.unwrap();
    assert_eq!(status["role"], "datacenter");
    println!(
        "cap {CAP}: {} idle connections opened, {closed} closed by the server, authenticated GET answered in {:?}",
        CAP + EXTRA,
        started.elapsed()
    );
    assert!(
        http.closed.with_label_values(&["evicted"]).get() as usize >= EXTRA,
        "counted as evicted"
    );
    drop(idle);
    n.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_huge_body_is_answered_408_and_dropped_at_the_body_timeout() {
    const BODY_TIMEOUT: Duration = Duration::from_millis(1500);
    let (n, dir) = start("api-body", |c| {
        c.limits.api_body_timeout = BODY_TIMEOUT;
        // Big enough that only the timeout can stop this body.
        c.limits.api_body_bytes_max = 512 * 1024 * 1024;
    })
    .await;
    let mut s = TcpStream::connect(n.api_addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n",
        n.shared.token
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    // A byte every 100 ms, past the timeout, until the answer starts: a timer reset at every
    // byte (tower-http's TimeoutBody) would never fire. Stopping at the answer keeps the last
    // bytes read, so the server closes with a FIN rather than a reset that could eat its answer.
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(false);
    let trickle = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = seen_rx.changed() => break,
            }
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(k) => {
                    out.extend_from_slice(&buf[..k]);
                    let _ = seen_tx.send(true);
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    trickle.abort();
    let answer = String::from_utf8_lossy(&out).into_owned();
    assert!(
        read.is_ok(),
        "the trickled body still held its connection after {DEADLINE:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let err = body_json(&answer)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(err.contains("api_body_timeout"), "{err}");
    assert!(
        took >= BODY_TIMEOUT,
        "cut after {took:?}, before the timeout"
    );
    println!("a 200 MB Content-Length trickled at 10 B/s: 408 and closed after {took:?} (limit {BODY_TIMEOUT:?})");
    assert_eq!(n.shared.metrics.http.body_timeouts.get(), 1);
    n.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_head_connections_are_closed_at_their_timeouts() {
    const HEADER_TIMEOUT: Duration = Duration::from_millis(800);
    const IDLE_TIMEOUT: Duration = Duration::from_millis(1200);
    let (n, dir) = start("api-idle", |c| {
        c.limits.api_header_timeout = HEADER_TIMEOUT;
        c.limits.api_idle_timeout = IDLE_TIMEOUT;
    })
    .await;
    // Silent: closed at the idle timeout.
    let started = Instant::now();
    let mut silent = TcpStream::connect(n.api_addr).await.unwrap();
    let got = read_to_close(&mut silent, DEADLINE).await.unwrap();
    let idle_took = started.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(idle_took >= IDLE_TIMEOUT, "closed after {idle_took:?}");

    // A head trickled a byte at a time: closed at the header timeout, from its first byte.
    let started = Instant::now();
    let s = TcpStream::connect(n.api_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        let head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, rd.read_to_end(&mut out)).await;
    let head_took = started.elapsed();
    trickle.abort();
    assert!(
        read.is_ok(),
        "a trickled head held its connection past {DEADLINE:?}"
    );
    assert!(
        head_took >= HEADER_TIMEOUT && head_took < IDLE_TIMEOUT + HEADER_TIMEOUT,
        "closed after {head_took:?}"
    );
    println!("silent connection closed after {idle_took:?} (idle {IDLE_TIMEOUT:?}); trickled head after {head_took:?} (header {HEADER_TIMEOUT:?})");
    let http = &n.shared.metrics.http;
    assert_eq!(http.closed.with_label_values(&["idle"]).get(), 1);
    assert_eq!(http.closed.with_label_values(&["header_timeout"]).get(), 1);
    // Keep-alive still works for a client that keeps talking.
    let c = reqwest::Client::new();
    for _ in 0..3 {
        let r = c
            .get(format!("http://{}/healthz", n.api_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    n.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_413_as_json() {
    let (n, dir) = start("api-413", |c| c.limits.api_body_bytes_max = 1024).await;
    let c = reqwest::Client::new();
    let resp = c
        .post(format!("http://{}/v1/events", n.api_addr))
        .bearer_auth(&n.shared.token)
        .header("content-type", "application/json")
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let v: Value = resp.json().await.unwrap();
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("api_body_bytes_max"), "{v}");
    // axum's other plain-text refusals are JSON too (a wrong method: 405).
    let resp = c
        .delete(format!("http://{}/v1/digest", n.api_addr))
        .bearer_auth(&n.shared.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].is_string(), "{v}");
    n.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_api_bounds_have_defaults_and_a_bad_one_is_refused_naming_its_field() {
    let base = "role = \"datacenter\"\nname = \"dc\"\ndata_dir = \"/tmp/x\"\n";
    let c = outpost::config::parse(base, "test", None).unwrap();
    assert_eq!(c.limits.api_connections_max, 1024);
    assert_eq!(c.limits.api_header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.api_idle_timeout, Duration::from_secs(60));
    assert_eq!(c.limits.api_body_timeout, Duration::from_secs(30));
    let set = format!(
        "{base}[limits]\napi_connections_max = 8\napi_header_timeout = \"2s\"\n\
         api_idle_timeout = \"90s\"\napi_body_timeout = \"5m\"\n"
    );
    let c = outpost::config::parse(&set, "test", None).unwrap();
    assert_eq!(c.limits.api_connections_max, 8);
    assert_eq!(c.limits.api_idle_timeout, Duration::from_secs(90));
    assert_eq!(c.limits.api_body_timeout, Duration::from_secs(300));
    for (line, field) in [
        ("api_connections_max = 0", "limits.api_connections_max"),
        ("api_header_timeout = \"soon\"", "limits.api_header_timeout"),
        ("api_idle_timeout = \"0s\"", "limits.api_idle_timeout"),
        ("api_body_timeout = \"-1s\"", "limits.api_body_timeout"),
    ] {
        let e = outpost::config::parse(&format!("{base}[limits]\n{line}\n"), "test", None)
            .expect_err(line);
        assert_eq!(e.field, field, "{line}: {e}");
    }
}
