//! The systemd notify protocol (`sd_notify(3)`), spoken directly: one datagram per message to the
//! `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or an abstract name after a leading `@`).
//! No crate: the protocol is a few lines of `KEY=VALUE` text and std has every piece.
//!
//! It must never fail the node: a supervisor that is gone or slow costs a log line, not a
//! request. Children the node starts later (worker role) must not inherit `$NOTIFY_SOCKET` or
//! `$WATCHDOG_*` (a child could feed the watchdog of a stuck node): remove
//! [`CHILD_ENV_REMOVE`] from their environment.

use crate::limits::{NOTIFY_SEND_TIMEOUT, NOTIFY_STATUS_BYTES_MAX};
use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a child process must not inherit from the node's environment.
pub const CHILD_ENV_REMOVE: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "OUTPOST_TOKEN",
];

/// Why the notify environment could not be used. The node then runs without notifying.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?}: expected an absolute path or @abstract-name")]
    BadSocket(String),
    #[error("NOTIFY_SOCKET: cannot create a datagram socket: {0}")]
    Socket(#[source] io::Error),
    #[error("WATCHDOG_USEC={0:?}: expected a positive number of microseconds")]
    BadWatchdog(String),
}

/// A handle on the supervisor; cheap to clone. Disabled (every call a no-op) when the node was
/// not started by systemd.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

struct Target {
    sock: UnixDatagram,
    addr: SocketAddr,
    name: String,
    /// Set after the first failed send, so a missing supervisor is logged once.
    failed: AtomicBool,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("socket", &self.target.as_ref().map(|t| t.name.as_str()))
            .field("watchdog", &self.watchdog)
            .finish()
    }
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From the process environment: `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var_os("WATCHDOG_USEC");
        let pid = std::env::var_os("WATCHDOG_PID");
        Notifier::from_vars(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// From explicit values, as `sd_notify(3)` and `sd_watchdog_enabled(3)` read them: the
    /// watchdog is ours only if `WATCHDOG_PID` is unset or names `my_pid`.
    pub fn from_vars(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        my_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let bytes = socket.as_bytes();
        let name = socket.to_string_lossy().into_owned();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(socket)),
            _ => return Err(NotifyError::BadSocket(name)),
        }
        .map_err(|_| NotifyError::BadSocket(name.clone()))?;
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        sock.set_write_timeout(Some(NOTIFY_SEND_TIMEOUT))
            .map_err(NotifyError::Socket)?;
        let ours = watchdog_pid
            .is_none_or(|p| p.to_str().and_then(|p| p.trim().parse().ok()) == Some(my_pid));
        let watchdog = match watchdog_usec {
            Some(v) if ours => {
                let text = v.to_string_lossy();
                match text.trim().parse::<u64>() {
                    Ok(us) if us > 0 => Some(Duration::from_micros(us)),
                    _ => return Err(NotifyError::BadWatchdog(text.into_owned())),
                }
            }
            _ => None,
        };
        Ok(Notifier {
            target: Some(Arc::new(Target {
                sock,
                addr,
                name,
                failed: AtomicBool::new(false),
            })),
            watchdog,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `WATCHDOG_USEC`, when the supervisor expects watchdog pings from this process.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// How often to ping: half the timeout, as `sd_watchdog_enabled(3)` advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_timeout().map(|d| d / 2)
    }

    /// The node is up: its database is open and its endpoints bound.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// One line for `systemctl status`.
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", status_text(text)));
    }

    /// The work loop went round: keeps the supervisor's watchdog from firing.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// The node is shutting down (SIGTERM); the supervisor stops expecting pings.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Sends one message of `KEY=VALUE` lines. Failures are logged once and otherwise ignored.
    pub fn send(&self, message: &str) {
        let Some(t) = &self.target else {
            return;
        };
        match t.sock.send_to_addr(message.as_bytes(), &t.addr) {
            Ok(_) => {
                if t.failed.swap(false, Ordering::Relaxed) {
                    tracing::info!(socket = %t.name, "the supervisor's notify socket works again");
                }
            }
            Err(e) => {
                if !t.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(socket = %t.name, "cannot notify the supervisor: {e}");
                }
            }
        }
    }
}

/// A STATUS value: one line, at most [`NOTIFY_STATUS_BYTES_MAX`] bytes.
fn status_text(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > NOTIFY_STATUS_BYTES_MAX {
        let mut end = NOTIFY_STATUS_BYTES_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn unset_socket_disables_everything() {
        let n = Notifier::from_vars(None, Some(OsStr::new("1000000")), None, 1).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready();
    }

    #[test]
    fn relative_socket_is_refused() {
        let e = Notifier::from_vars(Some(OsStr::new("run/notify")), None, None, 1).unwrap_err();
        assert!(e.to_string().contains("absolute path"), "{e}");
    }

    #[test]
    fn watchdog_belongs_to_the_named_pid_only() {
        let s = Some(OsStr::new("@outpost-test-unused"));
        let us = Some(OsStr::new("3000000"));
        let mine = Notifier::from_vars(s, us, Some(OsStr::new("42")), 42).unwrap();
        assert_eq!(mine.watchdog_interval(), Some(Duration::from_millis(1500)));
        let other = Notifier::from_vars(s, us, Some(OsStr::new("43")), 42).unwrap();
        assert_eq!(other.watchdog_interval(), None);
        assert!(Notifier::from_vars(s, Some(OsStr::new("soon")), None, 42).is_err());
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("outpost-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_vars(Some(OsStr::new(&format!("@{name}"))), None, None, 1).unwrap();
        n.ready();
        n.status("two\nlines");
        assert_eq!(recv(&sock), "READY=1");
        assert_eq!(recv(&sock), "STATUS=two lines");
    }

    #[test]
    fn status_is_one_bounded_line() {
        let long = "é".repeat(NOTIFY_STATUS_BYTES_MAX);
        let s = status_text(&long);
        assert!(s.len() <= NOTIFY_STATUS_BYTES_MAX && !s.is_empty());
    }
}
