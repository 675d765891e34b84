//! `GET /v1/backup` of a datacenter: one backup at a time, written and streamed by
//! [`crate::http::backup`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use crate::datacenter::Shared;
use crate::http::backup::{stream_copy, write_copy};
use crate::http::{ApiError, ApiResult};

/// Held while a backup is written and streamed.
struct Busy(Arc<Shared>);

impl Busy {
    fn take(s: &Arc<Shared>) -> ApiResult<Busy> {
        if s.backup_running.swap(true, Ordering::AcqRel) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "a backup is already running; retry when it is done",
            ));
        }
        Ok(Busy(s.clone()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.backup_running.store(false, Ordering::Release);
    }
}

pub async fn get_backup(State(s): State<Arc<Shared>>) -> ApiResult<Response> {
    let busy = Busy::take(&s)?;
    let store = s.store.get()?;
    let written = tokio::task::spawn_blocking(move || write_copy(&store))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let copy = written.map_err(|e| {
        s.note_error(format!("backup failed: {e}"));
        ApiError::from(e)
    })?;
    s.metrics.backups.fetch_add(1, Ordering::Relaxed);
    Ok(stream_copy(copy, &s.meta.name, busy))
}
