//! A small blocking client for a node's local HTTP API, for the CLI's client commands: bearer
//! token, JSON in and out, and errors an operator can act on. It runs reqwest on a
//! current-thread tokio runtime of its own; it must never be used from inside another runtime.

use std::time::Duration;

use crate::limits::{
    CLI_CONNECT_TIMEOUT, CLI_DOWNLOAD_TIMEOUT, CLI_ERROR_BODY_SHOWN_MAX, CLI_REQUEST_TIMEOUT,
    CLI_UPLOAD_CHUNK_BYTES,
};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--api` is not a usable URL (bad usage).
    #[error("--api: {0}")]
    BadUrl(String),
    /// Nothing listens there.
    #[error("cannot reach the outpost API at {url} (is `outpost run` running?)")]
    Unreachable { url: String },
    /// The node answered with an error status; `message` is its `error` field or its body.
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    /// Anything else on the way: a timeout, a broken connection, an answer that is not JSON.
    #[error("{0}")]
    Other(String),
}

pub struct ApiClient {
    /// The API's base URL, e.g. `http://127.0.0.1:7480`.
    pub base: Url,
    /// Sent as `Authorization: Bearer <token>` when present.
    pub token: Option<String>,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl ApiClient {
    /// A client for the API at `base`; only `http://` (the API has no TLS).
    pub fn new(base: &str, token: Option<String>) -> Result<ApiClient, ClientError> {
        let base = Url::parse(base).map_err(|e| ClientError::BadUrl(format!("{base:?}: {e}")))?;
        if base.scheme() != "http" || base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(format!(
                "{base}: expected http://HOST:PORT (the API speaks plain HTTP on a local address)"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CLI_CONNECT_TIMEOUT)
            .timeout(CLI_REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Other(format!("cannot set up the HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Other(format!("cannot start the async runtime: {e}")))?;
        Ok(ApiClient {
            base,
            token,
            http,
            runtime,
        })
    }

    /// The URL of `segments` under the base; each segment is percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new: the base can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    pub fn get_json(&self, segments: &[&str]) -> Result<Value, ClientError> {
        self.request(Method::GET, segments, None)
    }

    pub fn post_json(&self, segments: &[&str], body: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, segments, Some(body))
    }

    pub fn delete_json(&self, segments: &[&str]) -> Result<Value, ClientError> {
        self.request(Method::DELETE, segments, None)
    }

    /// A streamed answer (`GET /v1/watch`), handed to `on_line` line by line until the stream
    /// ends or `on_line` returns false. No overall timeout: the stream is meant to go on.
    pub fn stream_lines(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let mut url = self.url(segments);
        url.query_pairs_mut().extend_pairs(query);
        let mut req = self
            .http
            .get(url.clone())
            .timeout(Duration::from_secs(100 * 365 * 86_400));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let base = self.base.as_str().trim_end_matches('/').to_owned();
        self.runtime.block_on(async move {
            let mut resp = req
                .send()
                .await
                .map_err(|e| transport_error(&base, &url, e))?;
            let status = resp.status();
            if !status.is_success() {
                let bytes = resp.bytes().await.unwrap_or_default();
                return Err(ClientError::Status {
                    status,
                    message: error_message(&bytes),
                });
            }
            let mut buf: Vec<u8> = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| transport_error(&base, &url, e))?
            {
                buf.extend_from_slice(&chunk);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    if !on_line(String::from_utf8_lossy(&line).trim_end()) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    /// PUTs `bytes` as `content_type` (`outpost config set`).
    pub fn put_bytes(
        &self,
        segments: &[&str],
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<Value, ClientError> {
        self.send(Method::PUT, segments, |r| {
            r.header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes)
        })
    }

    fn request(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.send(method, segments, |r| match body {
            Some(b) => r.json(b),
            None => r,
        })
    }

    fn send(
        &self,
        method: Method,
        segments: &[&str],
        with_body: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Value, ClientError> {
        let url = self.url(segments);
        let mut req = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req = with_body(req);
        let base = self.base.as_str().trim_end_matches('/').to_owned();
        self.runtime.block_on(async move {
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(&base, &url, e))?;
            json_answer(resp, &base, &url).await
        })
    }
}

/// The JSON answer of a successful request, or the error the node answered.
async fn json_answer(resp: reqwest::Response, base: &str, url: &Url) -> Result<Value, ClientError> {
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport_error(base, url, e))?;
    if !status.is_success() {
        return Err(ClientError::Status {
            status,
            message: error_message(&bytes),
        });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Other(format!("{url}: the answer is not JSON: {e}")))
}

/// What [`ApiClient::download`] wrote.
pub struct Downloaded {
    pub bytes: u64,
    pub blake3: String,
}

impl ApiClient {
    /// GETs `segments` into `dest` atomically: a temporary file beside it, fsynced, renamed
    /// over `dest`, the directory fsynced. Checks the length and, when the node sends it, the
    /// blake3 of what arrived. On failure `dest` is untouched and no temporary file is left.
    pub fn download(
        &self,
        segments: &[&str],
        dest: &std::path::Path,
        hash_header: &str,
    ) -> Result<Downloaded, ClientError> {
        let url = self.url(segments);
        let mut req = self.http.get(url.clone()).timeout(CLI_DOWNLOAD_TIMEOUT);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let base = self.base.as_str().trim_end_matches('/').to_owned();
        let tmp = super::files::temp_beside(dest);
        let result = self.runtime.block_on(async {
            let mut resp = req
                .send()
                .await
                .map_err(|e| transport_error(&base, &url, e))?;
            let status = resp.status();
            if !status.is_success() {
                let bytes = resp.bytes().await.unwrap_or_default();
                return Err(ClientError::Status {
                    status,
                    message: error_message(&bytes),
                });
            }
            let expected_len = resp.content_length();
            let expected_hash = resp
                .headers()
                .get(hash_header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut out = super::files::create_private(&tmp)
                .map_err(|e| ClientError::Other(format!("{}: {e}", tmp.display())))?;
            let mut h = blake3::Hasher::new();
            let mut bytes = 0u64;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| transport_error(&base, &url, e))?
            {
                use std::io::Write;
                out.write_all(&chunk)
                    .map_err(|e| ClientError::Other(format!("{}: {e}", tmp.display())))?;
                h.update(&chunk);
                bytes += chunk.len() as u64;
            }
            if let Some(n) = expected_len.filter(|n| *n != bytes) {
                return Err(ClientError::Other(format!(
                    "{url}: the answer ended after {bytes} of {n} bytes"
                )));
            }
            let blake3 = h.finalize().to_hex().to_string();
            if let Some(want) = expected_hash.filter(|w| *w != blake3) {
                return Err(ClientError::Other(format!(
                    "{url}: what arrived has blake3 {blake3}, the node sent {want}"
                )));
            }
            super::files::commit(out, &tmp, dest)
                .map_err(|e| ClientError::Other(format!("{}: {e}", dest.display())))?;
            Ok(Downloaded { bytes, blake3 })
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn transport_error(base: &str, url: &Url, e: reqwest::Error) -> ClientError {
    if e.is_connect() {
        ClientError::Unreachable {
            url: base.to_owned(),
        }
    } else if e.is_timeout() {
        ClientError::Other(format!(
            "{url}: no answer within {}s",
            CLI_REQUEST_TIMEOUT.as_secs()
        ))
    } else {
        ClientError::Other(format!("{url}: {e}"))
    }
}

/// The `error` field of an error answer, else its body as text.
fn error_message(body: &[u8]) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::String(s)) = map.get("error") {
            return s.clone();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no message)".to_owned();
    }
    let mut end = text.len().min(CLI_ERROR_BODY_SHOWN_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl ApiClient {
    /// POSTs the file at `path` as the request body, streamed (never read whole into memory);
    /// `progress` is told the bytes sent so far after each chunk. Answers the JSON reply.
    pub fn upload(
        &self,
        segments: &[&str],
        path: &std::path::Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        use tokio::io::AsyncReadExt;
        let url = self.url(segments);
        let base = self.base.as_str().trim_end_matches('/').to_owned();
        let shown = path.display().to_string();
        self.runtime.block_on(async {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| ClientError::Other(format!("{shown}: {e}")))?;
            let len = file
                .metadata()
                .await
                .map_err(|e| ClientError::Other(format!("{shown}: {e}")))?
                .len();
            let progress = std::sync::Arc::new(progress);
            let stream = futures_util::stream::unfold((file, 0u64), move |(mut f, sent)| {
                let progress = progress.clone();
                async move {
                    let mut buf = vec![0u8; CLI_UPLOAD_CHUNK_BYTES];
                    match f.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            let sent = sent + n as u64;
                            progress(sent);
                            Some((Ok::<_, std::io::Error>(buf), (f, sent)))
                        }
                        Err(e) => Some((Err(e), (f, sent))),
                    }
                }
            });
            let mut req = self
                .http
                .post(url.clone())
                .timeout(CLI_DOWNLOAD_TIMEOUT)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(stream));
            if let Some(token) = &self.token {
                req = req.bearer_auth(token);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(&base, &url, e))?;
            json_answer(resp, &base, &url).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_segments_are_percent_encoded() {
        let c = ApiClient::new("http://127.0.0.1:7480", None).unwrap();
        assert_eq!(
            c.url(&["v1", "state", "sip:alice@example.com/x y"])
                .as_str(),
            "http://127.0.0.1:7480/v1/state/sip:alice@example.com%2Fx%20y"
        );
        let c = ApiClient::new("http://127.0.0.1:7480/prefix/", None).unwrap();
        assert_eq!(c.url(&["v1", "digest"]).path(), "/prefix/v1/digest");
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(matches!(
            ApiClient::new("https://x:1", None),
            Err(ClientError::BadUrl(_))
        ));
        assert!(matches!(
            ApiClient::new("127.0.0.1:7480", None),
            Err(ClientError::BadUrl(_))
        ));
    }

    #[test]
    fn error_answers_show_their_error_field() {
        assert_eq!(
            error_message(br#"{"error":"account: too long"}"#),
            "account: too long"
        );
        assert_eq!(error_message(b"  plain text\n"), "plain text");
        assert_eq!(error_message(b""), "(no message)");
    }
}
