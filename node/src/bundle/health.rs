//! The network health checks (a TCP connect, an HTTP/1.0 GET) and the log tail quoted when
//! software fails one. Blocking, with explicit budgets.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::manifest::HttpTarget;
use crate::limits::{
    HEALTH_ATTEMPT_MAX, HEALTH_LOG_TAIL_BYTES, HEALTH_LOG_TAIL_LINES, HEALTH_RETRY_EVERY,
    HEALTH_STATUS_LINE_BYTES_MAX,
};

/// Why software failed its health check; the message says what was checked and what happened
/// (it becomes a deployment's or a configuration's reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HealthError {
    /// The software exited before the check passed; `log_tail` is [`log_tail`]'s quote.
    #[error(
        "health check {check}: {program} exited ({status}) {:.1}s after it started{log_tail}",
        ran.as_secs_f64()
    )]
    Exited {
        check: String,
        program: String,
        status: ExitStatus,
        ran: Duration,
        log_tail: String,
    },
    /// No attempt succeeded within the manifest's timeout.
    #[error(
        "health check {check}: no success within {}: {last}",
        humantime::format_duration(*timeout)
    )]
    Timeout {
        check: String,
        timeout: Duration,
        #[source]
        last: ProbeError,
    },
}

/// Why one attempt of a network check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The deadline passed before the first attempt.
    #[error("no attempt")]
    NoAttempt,
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sending the request: {0}")]
    Send(#[source] io::Error),
    #[error("reading the answer: {0}")]
    Read(#[source] io::Error),
    /// The first line is not an HTTP status line (quoted, at most 80 characters).
    #[error("not an HTTP answer: {line:?}")]
    NotHttp { line: String },
    /// A status other than 2xx.
    #[error("answered {0}")]
    Status(u16),
}

pub(crate) enum Failure {
    /// The software exited while it was being checked.
    Exited(ExitStatus),
    /// No attempt succeeded in time; the last attempt's error.
    Timeout(ProbeError),
}

/// Tries `attempt` (given its time budget) every 100 ms until it succeeds, `timeout` passes,
/// or `exited` reports that the software is gone.
pub(crate) fn retry(
    timeout: Duration,
    exited: impl Fn() -> Option<ExitStatus>,
    attempt: impl Fn(Duration) -> Result<(), ProbeError>,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let mut last = ProbeError::NoAttempt;
    loop {
        if let Some(status) = exited() {
            return Err(Failure::Exited(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Timeout(last));
        }
        match attempt((deadline - now).min(HEALTH_ATTEMPT_MAX)) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Timeout(last));
        }
        std::thread::sleep(HEALTH_RETRY_EVERY.min(deadline - now));
    }
}

fn connect(host: &str, port: u16, budget: Duration) -> Result<TcpStream, ProbeError> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|source| ProbeError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = ProbeError::NoAddress {
        host: host.to_owned(),
    };
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, budget.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(source) => last = ProbeError::Connect { addr, source },
        }
    }
    Err(last)
}

pub(crate) fn tcp_connect(host: &str, port: u16, budget: Duration) -> Result<(), ProbeError> {
    connect(host, port, budget).map(drop)
}

/// `GET path HTTP/1.0`; success is a 2xx status.
pub(crate) fn http_get(t: &HttpTarget, budget: Duration) -> Result<(), ProbeError> {
    let started = Instant::now();
    let mut stream = connect(&t.host, t.port, budget)?;
    let left = budget
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(ProbeError::Socket)?;
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: outpost-health\r\nConnection: close\r\n\r\n",
        t.path, t.port
    );
    stream
        .write_all(request.as_bytes())
        .map_err(ProbeError::Send)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < HEALTH_STATUS_LINE_BYTES_MAX {
        let n = stream.read(&mut buf).map_err(ProbeError::Read)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::NotHttp {
            line: truncate(&line, 80),
        })?;
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(ProbeError::Status(code))
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// "; last lines of LOG:\n..." or "" when the log is empty or unreadable.
pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let from = len.saturating_sub(HEALTH_LOG_TAIL_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if f.take(HEALTH_LOG_TAIL_BYTES)
        .read_to_end(&mut bytes)
        .is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(HEALTH_LOG_TAIL_LINES)..];
    format!("; last lines of {}:\n{}", path.display(), tail.join("\n"))
}
