//! The controller's change journal: machine, deployment and configuration changes appended
//! after each commit, bounded, read by `GET /v1/watch` (`watch.rs`).

use crate::limits::JOURNAL_BYTES_MAX;
use crate::limits::JOURNAL_MAX;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::watch;

/// One change: `kind` (`machine`, `deployment` or `config`), the name it filters by (a
/// configuration change's scope), its view.
pub(crate) struct Change {
    pub(crate) seq: u64,
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    pub(crate) view: Arc<Value>,
    /// The length of `view` as JSON.
    pub(crate) bytes: usize,
}

pub(crate) struct Journal {
    pub(crate) epoch: u64,
    /// The changes and the sum of their `bytes`.
    pub(crate) changes: Mutex<(VecDeque<Change>, usize)>,
    /// The newest sequence appended (0: none).
    pub(crate) tail: watch::Sender<u64>,
}

impl Journal {
    pub(crate) fn new() -> Journal {
        Journal {
            // Any value a previous run did not have: cursors of another run are refused.
            epoch: rand::random::<u32>() as u64,
            changes: Mutex::new((VecDeque::new(), 0)),
            tail: watch::Sender::new(0),
        }
    }

    /// Appends one change (the core thread, after its commit).
    pub(crate) fn push(&self, kind: &'static str, name: &str, view: Value) {
        let bytes = serde_json::to_vec(&view).map_or(0, |v| v.len()) + name.len();
        let mut guard = self.changes.lock().expect("journal lock");
        let (c, held) = &mut *guard;
        let seq = *self.tail.borrow() + 1;
        c.push_back(Change {
            seq,
            kind,
            name: name.to_owned(),
            view: Arc::new(view),
            bytes,
        });
        *held += bytes;
        while c.len() > JOURNAL_MAX || (*held > JOURNAL_BYTES_MAX && c.len() > 1) {
            if let Some(old) = c.pop_front() {
                *held -= old.bytes;
            }
        }
        drop(guard);
        self.tail.send_replace(seq);
    }

    pub(crate) fn tail(&self) -> u64 {
        *self.tail.borrow()
    }

    /// Up to `max` changes after `seq`, and the oldest sequence held.
    pub(crate) fn after(&self, seq: u64, max: usize) -> (Option<u64>, Vec<Entry>) {
        let guard = self.changes.lock().expect("journal lock");
        let c = &guard.0;
        let first = c.front().map(|x| x.seq);
        let skip = first.map_or(0, |f| seq.saturating_sub(f - 1) as usize);
        let out = c
            .iter()
            .skip(skip)
            .take(max)
            .map(|x| (x.seq, x.kind, x.name.clone(), x.view.clone()))
            .collect();
        (first, out)
    }
}

/// One change as the journal hands it out: sequence, kind, key, the JSON.
pub(crate) type Entry = (u64, &'static str, String, Arc<Value>);
