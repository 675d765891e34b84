//! Process groups on Linux: who is in one (`/proc/PID/stat`), signalling one (never init's,
//! never our own), and the pid file that lets a worker restarted after kill -9 find the group
//! its predecessor left running.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use rustix::process::{Pid, Signal};

/// What `/proc/PID/stat` says about a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: u32,
    /// `R`, `S`, `Z` (zombie), ...
    pub state: char,
    pub pgid: u32,
    /// Clock ticks after boot; with the pid, it names one process across pid reuse.
    pub start: u64,
}

/// Parses `/proc/PID/stat`. The command name (2nd field) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) ... starttime(22).
    Some(ProcStat {
        pid,
        state: rest.first()?.chars().next()?,
        pgid: rest.get(2)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

pub(crate) fn stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The processes of group `pgid` that are not zombies (a zombie runs nothing; it only waits
/// for its parent, which may be gone, to collect it).
pub(crate) fn live_members(pgid: u32) -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .filter(|s| s.pgid == pgid && s.state != 'Z')
        .collect()
}

/// Sends `sig` to every process of group `pgid`. A group that no longer exists is not an
/// error. Refuses groups 0 and 1 (which would mean "everyone") and the caller's own group.
pub(crate) fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    let own = rustix::process::getpgrp().as_raw_nonzero().get() as u32;
    let target = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1 && *p as u32 != own)
        .and_then(Pid::from_raw)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to signal process group {pgid}"),
            )
        })?;
    match rustix::process::kill_process_group(target, sig) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The file under the software directory naming the supervised group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PidRecord {
    pub pid: u32,
    pub pgid: u32,
    pub start: u64,
}

impl PidRecord {
    fn to_text(&self) -> String {
        format!(
            "pid={}\npgid={}\nstart={}\n",
            self.pid, self.pgid, self.start
        )
    }

    fn parse(text: &str) -> Option<PidRecord> {
        let mut pid = None;
        let mut pgid = None;
        let mut start = None;
        for line in text.lines() {
            match line.split_once('=')? {
                ("pid", v) => pid = Some(v.parse().ok()?),
                ("pgid", v) => pgid = Some(v.parse().ok()?),
                ("start", v) => start = Some(v.parse().ok()?),
                _ => {}
            }
        }
        Some(PidRecord {
            pid: pid?,
            pgid: pgid?,
            start: start?,
        })
    }

    /// Whether the group this record names still has live members, and they are the ones
    /// the record was written for rather than a later group that reuses the number: while
    /// the leader lives, its start time must match; once it is gone, the kernel does not hand
    /// out the group's number again while any member remains, and those members started
    /// after the leader.
    pub fn group_alive(&self) -> bool {
        let members = live_members(self.pgid);
        match members.iter().find(|p| p.pid == self.pid) {
            Some(leader) => leader.start == self.start,
            None => members.iter().any(|p| p.start >= self.start),
        }
    }
}

/// Writes the record atomically (temporary file, fsync, rename, fsync of the directory).
pub(crate) fn write_pid_file(path: &Path, rec: &PidRecord) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".pid-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(rec.to_text().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `Ok(None)` when there is no file; a file that does not parse is removed and reported as
/// none (it names nothing that could be signalled safely).
pub(crate) fn read_pid_file(path: &Path) -> io::Result<Option<PidRecord>> {
    match fs::read_to_string(path) {
        Ok(text) => match PidRecord::parse(&text) {
            Some(r) => Ok(Some(r)),
            None => {
                tracing::warn!("{}: unreadable pid file removed", path.display());
                remove_pid_file(path)?;
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn remove_pid_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            fs::File::open(dir)?.sync_all()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_awkward_name_parses() {
        let line = "4242 (we) ird (na)me) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgid, 4242);
        assert_eq!(s.start, 987654);
    }

    #[test]
    fn own_process_is_found() {
        let me = stat(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.start > 0);
    }

    #[test]
    fn pid_record_round_trips_and_refuses_garbage() {
        let r = PidRecord {
            pid: 7,
            pgid: 7,
            start: 99,
        };
        assert_eq!(PidRecord::parse(&r.to_text()), Some(r));
        assert_eq!(PidRecord::parse("pid=x\n"), None);
        assert_eq!(PidRecord::parse("pid=1\n"), None);
    }

    #[test]
    fn never_signals_init_or_own_group() {
        assert!(signal_group(0, Signal::TERM).is_err());
        assert!(signal_group(1, Signal::TERM).is_err());
        let own = rustix::process::getpgrp().as_raw_nonzero().get() as u32;
        assert!(signal_group(own, Signal::TERM).is_err());
    }
}
