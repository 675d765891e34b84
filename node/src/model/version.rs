//! Versions and the hybrid logical clock that issues them.
//!
//! A version is (physical ms, logical counter, node id), ordered in that order, so ties between
//! datacenters are broken by node id and every node orders versions the same way. The clock is
//! pure: the caller passes `now_ms` in and persists [`Hlc::state`] in the same commit as the
//! versions it issued.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

#[derive(Copy, Clone, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
pub struct Version {
    pub ms: u64,
    pub logical: u32,
    pub node: NodeId,
}

impl Version {
    pub const ZERO: Version = Version {
        ms: 0,
        logical: 0,
        node: NodeId(0),
    };
}

/// Fixed width, so that the string order is the version order: `ms.logical.node`, e.g.
/// `00000001732250000123.0000000000.0123456789abcdef0011223344556677`.
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020}.{:010}.{}", self.ms, self.logical, self.node)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}@{:?}", self.ms, self.logical, self.node)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed version {0:?}: expected <20 digits>.<10 digits>.<32 hex>")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.chars().take(80).collect());
        let mut parts = s.split('.');
        let (Some(ms), Some(logical), Some(node), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        if ms.len() != 20 || logical.len() != 10 {
            return Err(err());
        }
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(ms) || !all_digits(logical) {
            return Err(err());
        }
        Ok(Version {
            ms: ms.parse().map_err(|_| err())?,
            logical: logical.parse().map_err(|_| err())?,
            node: node.parse().map_err(|_| err())?,
        })
    }
}

/// The hybrid logical clock of one node.
#[derive(Clone, Debug)]
pub struct Hlc {
    node: NodeId,
    ms: u64,
    logical: u32,
    /// How far a remote version may push this clock ahead of the local physical time. Remote
    /// elements are always applied; only the clock's adoption of their time is bounded.
    max_forward_ms: u64,
}

impl Hlc {
    pub const DEFAULT_MAX_FORWARD_MS: u64 = 60_000;

    /// Restores a clock from its persisted state (`(0, 0)` for a new node).
    pub fn new(node: NodeId, state: (u64, u32)) -> Self {
        Hlc {
            node,
            ms: state.0,
            logical: state.1,
            max_forward_ms: Self::DEFAULT_MAX_FORWARD_MS,
        }
    }

    /// What must be persisted so that no version is ever issued twice.
    pub fn state(&self) -> (u64, u32) {
        (self.ms, self.logical)
    }

    /// A new version greater than every version this clock issued or observed, and greater than
    /// `floor` (the current version of the entry being written).
    pub fn issue(&mut self, now_ms: u64, floor: Version) -> Version {
        if now_ms > self.ms {
            self.ms = now_ms;
            self.logical = 0;
        } else {
            self.bump();
        }
        if (self.ms, self.logical) <= (floor.ms, floor.logical) {
            self.ms = floor.ms;
            self.logical = floor.logical;
            self.bump();
        }
        Version {
            ms: self.ms,
            logical: self.logical,
            node: self.node,
        }
    }

    /// Takes note of a remote version, so that later local versions order after it. A version
    /// further ahead than `max_forward_ms` of `now_ms` moves the clock only that far.
    pub fn observe(&mut self, now_ms: u64, v: Version) {
        let limit = now_ms.saturating_add(self.max_forward_ms);
        let (ms, logical) = if v.ms > limit {
            (limit, 0)
        } else {
            (v.ms, v.logical)
        };
        if (ms, logical) > (self.ms, self.logical) {
            self.ms = ms;
            self.logical = logical;
        }
    }

    fn bump(&mut self) {
        if self.logical == u32::MAX {
            self.ms += 1;
            self.logical = 0;
        } else {
            self.logical += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn issue_is_monotonic_even_when_time_goes_back() {
        let mut c = Hlc::new(NodeId(1), (0, 0));
        let a = c.issue(1000, Version::ZERO);
        let b = c.issue(900, Version::ZERO);
        let d = c.issue(1000, Version::ZERO);
        assert!(a < b && b < d);
    }

    #[test]
    fn issue_exceeds_the_entry_floor() {
        let mut c = Hlc::new(NodeId(1), (0, 0));
        let floor = Version {
            ms: 5000,
            logical: 7,
            node: NodeId(9),
        };
        let v = c.issue(10, floor);
        assert!(v > floor);
    }

    #[test]
    fn observe_is_bounded() {
        let mut c = Hlc::new(NodeId(1), (0, 0));
        c.observe(
            1000,
            Version {
                ms: u64::MAX / 2,
                logical: 0,
                node: NodeId(2),
            },
        );
        assert_eq!(c.state().0, 1000 + Hlc::DEFAULT_MAX_FORWARD_MS);
    }

    proptest! {
        #[test]
        fn version_string_order_is_version_order(a: (u64, u32, u128), b: (u64, u32, u128)) {
            let va = Version { ms: a.0 % 10u64.pow(19), logical: a.1, node: NodeId(a.2) };
            let vb = Version { ms: b.0 % 10u64.pow(19), logical: b.1, node: NodeId(b.2) };
            prop_assert_eq!(va.cmp(&vb), va.to_string().cmp(&vb.to_string()));
            prop_assert_eq!(va.to_string().parse::<Version>().unwrap(), va);
        }
    }
}
