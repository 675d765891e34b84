//! What every role's HTTP API shares: the server ([`serve`]), the JSON error every refusal is
//! (`{"error"}` with a 4xx or 5xx), the bearer-token check, `/healthz` and `/readyz`, the
//! `/metrics` scrape ([`metrics::Scrape`]), the streamed database copy of `GET /v1/backup`
//! ([`backup`]) and the change-feed plumbing of `GET /v1/watch` ([`watch`]). The routes
//! themselves live with their role: `crate::datacenter::api`, `crate::cluster::controller::api`,
//! `crate::cluster::worker::api`.

pub mod backup;
pub mod metrics;
pub mod serve;
pub mod watch;

pub use backup::HASH_HEADER as BACKUP_HASH_HEADER;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::replication::StoreError;

pub struct ApiError {
    status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    /// The status the refusal is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; nothing was changed, retry when space is freed"),
            ),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// `GET /healthz` of every role, without a token: 200 while the process serves HTTP at all.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "alive": true }))
}

/// `GET /readyz` of every role, without a token: 200 `{"ready": true, "role"}` when ready to
/// serve, else 503 `{"ready": false, "role", "error": reason}`; `extra`'s fields are added.
pub(crate) fn readiness(
    role: crate::wire::Role,
    check: Result<(), impl std::fmt::Display>,
    extra: Value,
) -> Response {
    let mut body = json!({ "ready": check.is_ok(), "role": role });
    if let Err(reason) = &check {
        body["error"] = json!(reason.to_string());
    }
    if let (Some(b), Value::Object(more)) = (body.as_object_mut(), extra) {
        b.extend(more);
    }
    let status = if check.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub(crate) fn check_bearer(headers: &axum::http::HeaderMap, token: &str) -> Result<(), ApiError> {
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see the `token` file in the data directory)",
        ))
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
