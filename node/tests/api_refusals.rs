//! Invariant 7 at the HTTP API: a bad request gets a 4xx with a reason naming what is wrong, and
//! changes no stored state; a batch with one bad event stores none of it.

use outpost::config::Config;
use outpost::datacenter;
use outpost::wire::Role;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_reason_and_change_nothing() {
    let dir = std::env::temp_dir().join(format!("outpost-api-{}", rand::random::<u64>()));
    outpost::roles::init(&dir, Role::Datacenter, Some("dc")).unwrap();
    let mut c = Config::with_defaults(Role::Datacenter, "dc", &dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c.limits.batch_events_max = 5;
    let n = datacenter::start(c).await.unwrap();
    let base = format!("http://{}", n.api_addr);
    let http = reqwest::Client::new();
    let token = n.shared.token.clone();
    let post = |path: &str, body: String, auth: bool| {
        let mut r = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if auth {
            r = r.bearer_auth(&token);
        }
        r.send()
    };
    let cases: Vec<(&str, String, bool, u16, &str)> = vec![
        ("/v1/events", "{}".into(), false, 401, "token"),
        ("/v1/events", "{\"account\":".into(), true, 400, "body"),
        ("/v1/events", json!({"account": "a", "type": "fax", "data": {}}).to_string(), true, 400, "type"),
        ("/v1/events", json!({"account": "", "type": "presence", "data": {"status": "x"}}).to_string(), true, 400, "account"),
        ("/v1/events", json!({"account": "a".repeat(257), "type": "presence", "data": {"status": "x"}}).to_string(), true, 400, "account"),
        ("/v1/events", json!({"account": "a", "type": "call", "data": {"call_id": "c"}}).to_string(), true, 400, "action"),
        ("/v1/events", json!({"account": "a", "type": "presence", "data": {"status": "x"}, "extra": 1}).to_string(), true, 400, "extra"),
        (
            "/v1/events/batch",
            json!([{"account": "a", "type": "presence", "data": {"status": "ok"}},
                   {"account": "b", "type": "register", "data": {"contact": "", "expires_s": 5}}]).to_string(),
            true, 400, "[1].data.contact",
        ),
        (
            "/v1/events/batch",
            Value::Array((0..6).map(|i| json!({"account": format!("a{i}"), "type": "presence", "data": {"status": "x"}})).collect()).to_string(),
            true, 413, "batch_events_max",
        ),
    ];
    for (path, body, auth, want, names) in cases {
        let resp = post(path, body.clone(), auth).await.unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        let error = answer["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, want, "{path} {body}: {answer}");
        assert!(
            error.contains(names),
            "{path} {body}: error {error:?} should name {names:?}"
        );
    }
    let get = http
        .get(format!("{base}/v1/messages/xyz"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 400);
    let (_, entries) = n.shared.store.digest().unwrap();
    assert_eq!(entries, 0, "nothing of any refused request was stored");
    // A good request still works.
    let ok = post(
        "/v1/events",
        json!({"account": "a", "type": "presence", "data": {"status": "x"}}).to_string(),
        true,
    )
    .await
    .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let ack: Value = ok.json().await.unwrap();
    let id = ack["message_id"].as_str().unwrap();
    let origin = ack["origin"].as_str().unwrap();
    let oseq = ack["oseq"].as_u64().unwrap();
    // The acknowledgement's locator finds the message directly; a wrong or half locator does not.
    let lookup = |query: String| {
        http.get(format!("{base}/v1/messages/{id}{query}"))
            .bearer_auth(&token)
            .send()
    };
    let by_id: Value = lookup(String::new()).await.unwrap().json().await.unwrap();
    let at = lookup(format!("?origin={origin}&oseq={oseq}"))
        .await
        .unwrap();
    assert_eq!(at.status().as_u16(), 200);
    assert_eq!(at.json::<Value>().await.unwrap(), by_id);
    assert_eq!(by_id["oseq"].as_u64(), Some(oseq));
    for (query, want, names) in [
        (format!("?origin={origin}"), 400, "give both"),
        (format!("?oseq={oseq}"), 400, "give both"),
        (format!("?origin={origin}&oseq=x"), 400, "oseq"),
        (format!("?origin=zz&oseq={oseq}"), 400, "origin"),
        (
            format!("?origin={origin}&oseq={}", oseq + 1),
            404,
            "not known",
        ),
    ] {
        let resp = lookup(query.clone()).await.unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(status, want, "{query}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(names),
            "{query}: {error:?} should name {names:?}"
        );
    }
    n.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
