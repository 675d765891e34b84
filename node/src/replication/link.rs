//! The sending half of one peer link, sans I/O: which slice of the local log to send next, how
//! much may be in flight, and when to go back to the last acknowledged position. It lives
//! inside [`super::session::Session`], which both the simulation and the QUIC driver run. Over
//! QUIC a stream loses nothing within a connection (a lost connection is a new session that
//! resumes from the peer's Hello), so only the simulation, whose transport loses and reorders
//! frames within a session, ticks the retransmit timer.

/// Bounds of one link.
#[derive(Clone, Copy, Debug)]
pub struct LinkLimits {
    /// Most log records in one Elements frame.
    pub batch_max: usize,
    /// Most log positions sent but not acknowledged.
    pub in_flight_max: u64,
    /// Without ack progress for this long while something is in flight, resend from the ack.
    pub retransmit_ms: u64,
}

impl Default for LinkLimits {
    fn default() -> Self {
        LinkLimits {
            batch_max: 1024,
            in_flight_max: 16 * 1024,
            retransmit_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outbound {
    limits: LinkLimits,
    /// The peer has durably applied our log up to here.
    acked: u64,
    /// We have sent up to here.
    sent: u64,
    progress_ms: u64,
}

impl Outbound {
    /// A link that starts sending after `acked`.
    pub fn new(limits: LinkLimits, acked: u64, now_ms: u64) -> Self {
        Outbound {
            limits,
            acked,
            sent: acked,
            progress_ms: now_ms,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The next slice `(after, upto]` to send, given the local log's tail, if the window allows.
    pub fn next_range(&self, tail: u64) -> Option<(u64, u64)> {
        if self.sent >= tail {
            return None;
        }
        let window_end = self.acked + self.limits.in_flight_max;
        if self.sent >= window_end {
            return None;
        }
        let upto = tail
            .min(self.sent + self.limits.batch_max as u64)
            .min(window_end);
        Some((self.sent, upto))
    }

    /// The slice up to `upto` went out.
    pub fn on_sent(&mut self, upto: u64, now_ms: u64) {
        if self.sent == self.acked {
            // Nothing was in flight: the retransmit clock starts now.
            self.progress_ms = now_ms;
        }
        self.sent = self.sent.max(upto);
    }

    /// The peer acknowledged up to `upto`. Returns whether that was progress.
    pub fn on_ack(&mut self, upto: u64, now_ms: u64) -> bool {
        if upto <= self.acked {
            return false;
        }
        self.acked = upto;
        self.sent = self.sent.max(upto);
        self.progress_ms = now_ms;
        true
    }

    /// Goes back to the last ack when nothing has moved for `retransmit_ms`.
    pub fn on_tick(&mut self, now_ms: u64) {
        if self.sent > self.acked
            && now_ms.saturating_sub(self.progress_ms) >= self.limits.retransmit_ms
        {
            self.sent = self.acked;
            self.progress_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_retransmit() {
        let limits = LinkLimits {
            batch_max: 10,
            in_flight_max: 25,
            retransmit_ms: 100,
        };
        let mut o = Outbound::new(limits, 0, 0);
        assert_eq!(o.next_range(0), None);
        assert_eq!(o.next_range(100), Some((0, 10)));
        o.on_sent(10, 0);
        o.on_sent(20, 0);
        assert_eq!(o.next_range(100), Some((20, 25)));
        o.on_sent(25, 0);
        assert_eq!(o.next_range(100), None, "window full");
        o.on_tick(50);
        assert_eq!(o.sent(), 25);
        o.on_tick(100);
        assert_eq!(o.sent(), 0, "no progress: back to the ack");
        assert!(o.on_ack(10, 120));
        assert!(!o.on_ack(5, 121));
        assert_eq!(o.next_range(100), Some((10, 20)));
    }
}
