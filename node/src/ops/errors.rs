//! The last errors a node met, for `outpost status`: bounded, timestamped, also logged.

use crate::limits::LAST_ERRORS_MAX;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, Default)]
pub struct ErrorLog(Mutex<VecDeque<String>>);

impl ErrorLog {
    /// Logs `e` as a warning and keeps it (the oldest goes beyond [`LAST_ERRORS_MAX`]).
    pub fn note(&self, e: &str) {
        tracing::warn!("{e}");
        self.record(e);
    }

    /// Keeps `e` without logging it.
    pub fn record(&self, e: &str) {
        // Only whole strings are pushed and popped, so a poisoned lock holds nothing half-done.
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == LAST_ERRORS_MAX {
            q.pop_front();
        }
        q.push_back(format!(
            "{} {e}",
            humantime::format_rfc3339_seconds(SystemTime::now())
        ));
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_errors_only() {
        let log = ErrorLog::default();
        for i in 0..LAST_ERRORS_MAX + 3 {
            log.note(&format!("e{i}"));
        }
        let l = log.list();
        assert_eq!(l.len(), LAST_ERRORS_MAX);
        assert!(l[0].ends_with(" e3"), "{l:?}");
        assert!(l
            .last()
            .unwrap()
            .ends_with(&format!(" e{}", LAST_ERRORS_MAX + 2)));
    }
}
