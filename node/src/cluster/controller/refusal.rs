//! Rate-limited log lines for refused connections and Joins: the first of each kind in an
//! interval in full, the rest counted.

use crate::limits::REFUSAL_KINDS_MAX;
use std::collections::BTreeMap;
use std::time::Duration;

/// The rate limit of refusal log lines (see [`REFUSAL_LOG_EVERY`]). Pure: the caller passes
/// the time.
#[derive(Debug)]
pub(crate) struct RefusalLog {
    every: Duration,
    /// When the current interval began (None: nothing refused since the last summary).
    since: Option<tokio::time::Instant>,
    /// Refusals of each kind in the current interval.
    counts: BTreeMap<String, u64>,
}

impl RefusalLog {
    pub(crate) fn new(every: Duration) -> RefusalLog {
        RefusalLog {
            every,
            since: None,
            counts: BTreeMap::new(),
        }
    }

    /// One refusal of `kind`. Returns whether to log it in full (the first of its kind in the
    /// interval) and the summary of the interval that just ended, if any.
    pub(crate) fn note(&mut self, kind: &str, now: tokio::time::Instant) -> (bool, Option<String>) {
        let summary = self.flush(now);
        self.since.get_or_insert(now);
        let kind = if self.counts.contains_key(kind) || self.counts.len() < REFUSAL_KINDS_MAX {
            kind
        } else {
            "other"
        };
        let n = self.counts.entry(kind.to_owned()).or_insert(0);
        *n += 1;
        (*n == 1, summary)
    }

    /// The summary of the interval, once it has ended: `None` when it has not, or when every
    /// refusal in it was logged in full.
    pub(crate) fn flush(&mut self, now: tokio::time::Instant) -> Option<String> {
        let since = self.since?;
        if now.duration_since(since) < self.every {
            return None;
        }
        self.since = None;
        let counts = std::mem::take(&mut self.counts);
        let held: u64 = counts.values().map(|n| n - 1).sum();
        if held == 0 {
            return None;
        }
        let total: u64 = counts.values().sum();
        let kinds: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        Some(format!(
            "refused {total} connections in the last {:?} ({}); {held} of them not logged one by one",
            self.every,
            kinds.join(", ")
        ))
    }
}
