//! Wall-clock time as the node reads it: the one place that asks the operating system what time
//! it is (milliseconds since the Unix epoch). Cores never call this; their drivers pass `now`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
