//! The configuration data endpoints of the controller's API. A scope is `service/S`,
//! `component/S/C` or `machine/NAME`:
//!
//! ```text
//! PUT    /v1/config/SCOPE            a JSON object (or TOML with Content-Type application/toml)
//!                                    -> 200 {"scope","version","machines":[names sent it],
//!                                            "waiting":[{"name","reason"}]}
//! GET    /v1/config/SCOPE            -> {"scope","version","doc","at","note"} (404: none)
//! DELETE /v1/config/SCOPE            -> like PUT (a new version without a document)
//! GET    /v1/config/SCOPE/history    -> [{"scope","version","doc","at","note"}], newest first
//! POST   /v1/config/SCOPE/rollback   {"version": N} -> like PUT (a new version holding N's)
//! GET    /v1/machines/{name}/config  -> the machine's effective configuration and its state
//! ```
//!
//! Changes are answered after their commit, like every operator action.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::cmd::{Cmd, ConfigCmd, ConfigCmdError, ConfigReply};
use super::configdata::{self, Scope};
use super::core::ConfigSet;
use super::shared::ControllerShared;
use super::views::*;
use crate::http::ApiError;

type S = State<Arc<ControllerShared>>;

async fn ask<T>(
    s: &ControllerShared,
    make: impl FnOnce(ConfigReply<T>) -> ConfigCmd,
) -> Result<T, ApiError> {
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "controller is shutting down",
        )
    };
    let (tx, rx) = oneshot::channel();
    let asked = async {
        s.cmd
            .send(Cmd::Config(make(tx)))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    };
    let wait = crate::limits::CORE_WAIT;
    let answer = tokio::time::timeout(wait, asked).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the controller's core did not answer within {wait:?}; retry"),
        )
    })??;
    answer.map_err(|e| match e {
        ConfigCmdError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        ConfigCmdError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
    })
}

/// A scope, and whether the path ends in `suffix` (`history`, `rollback`) after it.
fn scope_of(path: &str, suffix: &str) -> Result<(Scope, bool), ApiError> {
    if let Some(rest) = path.strip_suffix(&format!("/{suffix}")) {
        if let Ok(s) = Scope::parse(rest) {
            return Ok((s, true));
        }
    }
    Ok((scope_only(path)?, false))
}

fn scope_only(path: &str) -> Result<Scope, ApiError> {
    Scope::parse(path).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("path: {e}")))
}

fn set_json(set: &ConfigSet) -> Value {
    json!({
        "scope": set.change.scope,
        "version": set.change.version,
        "deleted": set.change.doc.is_none(),
        "machines": set.published,
        "waiting": set.waiting.iter().map(|(n, r)| json!({"name": n, "reason": r})).collect::<Vec<_>>(),
    })
}

fn is_toml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|t| t == "application/toml" || t == "text/toml")
}

pub(super) async fn put_config(
    State(s): S,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (scope, suffixed) = scope_of(&path, "history")?;
    if suffixed {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "a scope's history is read with GET",
        ));
    }
    if body.len() > crate::limits::CONFIG_DOC_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body: the document is {} bytes; at most {}",
                body.len(),
                crate::limits::CONFIG_DOC_BYTES_MAX
            ),
        ));
    }
    let doc = configdata::parse_doc(&body, is_toml(&headers))
        .map_err(|e| ApiError::bad(format!("body: {e}")))?;
    let set = ask(&s, |reply| ConfigCmd::Set {
        scope,
        doc: Some(doc),
        reply,
    })
    .await?;
    Ok(Json(set_json(&set)))
}

pub(super) async fn delete_config(
    State(s): S,
    Path(path): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let scope = scope_only(&path)?;
    let set = ask(&s, |reply| ConfigCmd::Set {
        scope,
        doc: None,
        reply,
    })
    .await?;
    Ok(Json(set_json(&set)))
}

pub(super) async fn get_config(
    State(s): S,
    Path(path): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (scope, history) = scope_of(&path, "history")?;
    let changes = ask(&s, |reply| ConfigCmd::History {
        scope: scope.clone(),
        reply,
    })
    .await?;
    if history {
        return Ok(Json(Value::Array(
            changes.iter().map(change_json).collect(),
        )));
    }
    match changes.first() {
        Some(c) if c.doc.is_some() => Ok(Json(change_json(c))),
        Some(c) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{} has no document (deleted at version {})",
                scope.key(),
                c.version
            ),
        )),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{} has no document", scope.key()),
        )),
    }
}

pub(super) async fn post_config(
    State(s): S,
    Path(path): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (scope, rollback) = scope_of(&path, "rollback")?;
    if !rollback {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "set a document with PUT; POST is for .../rollback",
        ));
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("body: not JSON: {e}")))?;
    let version = v
        .get("version")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::bad("version: a positive integer (see the scope's history)"))?;
    let set = ask(&s, |reply| ConfigCmd::Rollback {
        scope,
        version,
        reply,
    })
    .await?;
    Ok(Json(set_json(&set)))
}

pub(super) async fn get_machine_config(
    State(s): S,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let v = ask(&s, |reply| ConfigCmd::Effective { name, reply }).await?;
    let r = &v.record;
    Ok(Json(json!({
        "name": r.name,
        "service": r.service,
        "component": r.component,
        "doc": v.doc,
        "published": machine_config_json(r),
    })))
}
