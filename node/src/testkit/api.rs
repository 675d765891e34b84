//! An async client of a datacenter's HTTP API with typed answers, for tests, the benchmark and
//! the demo. Unlike the CLI's blocking client it runs on the caller's tokio runtime.

use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long to wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a whole answer (an event is answered after its commit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The node answered with an error status; `error` is its `error` field, or its body.
    #[error("HTTP {status}: {error}")]
    Status { status: u16, error: String },
    /// No answer: refused, reset, timed out.
    #[error("transport: {0}")]
    Transport(String),
    /// An answer that does not have the documented shape.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// One event as `POST /v1/events` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub account: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
}

impl Event {
    pub fn new(account: impl Into<String>, event_type: impl Into<String>, data: Value) -> Event {
        Event {
            account: account.into(),
            event_type: event_type.into(),
            data,
        }
    }
}

/// The answer to an acknowledged (durably committed) event.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Ack {
    pub message_id: String,
    /// The origin node and its sequence: where the message is stored (`GET /v1/messages` locator).
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub oseq: u64,
    pub element: Value,
    pub version: Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Digest {
    pub digest: String,
    pub entries: u64,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MessageInfo {
    pub message_id: String,
    pub origin: String,
    pub oseq: u64,
    pub first_seen_ms: u64,
    pub message_count: u64,
    /// The names of the peers a copy came from (an extension beside the contract).
    #[serde(default)]
    pub copies_from: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub addr: String,
    pub node_id: Option<String>,
    pub connected: bool,
    /// Whether this node is the one that dials the peer (an extension beside the contract).
    #[serde(default)]
    pub dials: Option<bool>,
    pub lag: u64,
    pub acked: u64,
    pub received: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Status {
    pub role: String,
    pub name: String,
    pub node_id: String,
    pub fingerprint: String,
    pub ready: bool,
    // Datacenter only; a controller's or worker's status has none of these.
    #[serde(default)]
    pub log_tail: u64,
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub last_errors: Vec<Value>,
}

impl Status {
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// A datacenter's API: `base` is `http://HOST:PORT`.
#[derive(Clone, Debug)]
pub struct Api {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Api {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .build()
            .expect("a plain HTTP client builds");
        Api {
            base: base.into().trim_end_matches('/').to_owned(),
            token: token.into(),
            http,
        }
    }

    pub async fn post_event(
        &self,
        account: &str,
        event_type: &str,
        data: Value,
    ) -> Result<Ack, ApiError> {
        self.post_json("/v1/events", &Event::new(account, event_type, data))
            .await
    }

    pub async fn post(&self, event: &Event) -> Result<Ack, ApiError> {
        self.post_json("/v1/events", event).await
    }

    /// All events of the batch are acknowledged together, in order.
    pub async fn post_batch(&self, events: &[Event]) -> Result<Vec<Ack>, ApiError> {
        let acks: Vec<Ack> = self.post_json("/v1/events/batch", events).await?;
        if acks.len() != events.len() {
            return Err(ApiError::Decode(format!(
                "{} answers to a batch of {} events",
                acks.len(),
                events.len()
            )));
        }
        Ok(acks)
    }

    pub async fn digest(&self) -> Result<Digest, ApiError> {
        self.get_json("/v1/digest").await
    }

    pub async fn status(&self) -> Result<Status, ApiError> {
        self.get_json("/v1/status").await
    }

    /// `None` when the node has never seen the message (404).
    pub async fn message(&self, message_id: &str) -> Result<Option<MessageInfo>, ApiError> {
        match self
            .get_json(&format!("/v1/messages/{}", encode_segment(message_id)))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(ApiError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The same as [`Api::message`], found directly by where it is stored (the `origin` and
    /// `oseq` of its acknowledgement) instead of a scan of the log.
    pub async fn message_at(
        &self,
        message_id: &str,
        origin: &str,
        oseq: u64,
    ) -> Result<Option<MessageInfo>, ApiError> {
        match self
            .get_json(&format!(
                "/v1/messages/{}?origin={}&oseq={oseq}",
                encode_segment(message_id),
                encode_segment(origin)
            ))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(ApiError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn state(&self, account: &str) -> Result<Value, ApiError> {
        self.get_json(&format!("/v1/state/{}", encode_segment(account)))
            .await
    }

    /// `GET /metrics` (no token needed), as text.
    pub async fn metrics(&self) -> Result<String, ApiError> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        Ok(body)
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        decode(req.send().await.map_err(transport)?).await
    }

    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    pub async fn put_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body);
        decode(req.send().await.map_err(transport)?).await
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ApiError> {
    let status = resp.status();
    let body = resp.bytes().await.map_err(transport)?;
    if !status.is_success() {
        return Err(status_error(status, &String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| {
        let shown: String = String::from_utf8_lossy(&body).chars().take(500).collect();
        ApiError::Decode(format!("{e} in {shown}"))
    })
}

fn status_error(status: StatusCode, body: &str) -> ApiError {
    let error = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(500).collect());
    ApiError::Status {
        status: status.as_u16(),
        error,
    }
}

fn transport(e: reqwest::Error) -> ApiError {
    // The Display of a reqwest error hides its cause ("error sending request"); show the chain.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    ApiError::Transport(msg)
}

/// Percent-encodes one path segment (accounts may hold any UTF-8).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("acct-1.x_y~"), "acct-1.x_y~");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn error_bodies_name_the_error() {
        let e = status_error(StatusCode::BAD_REQUEST, r#"{"error":"type: unknown"}"#);
        assert_eq!(e.to_string(), "HTTP 400: type: unknown");
        let e = status_error(StatusCode::BAD_GATEWAY, "oops");
        assert_eq!(e.to_string(), "HTTP 502: oops");
    }
}
