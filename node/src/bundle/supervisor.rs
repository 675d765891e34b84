//! Runs one installed bundle: its `exec` in its own process group, with a clean environment,
//! its output appended to a log; judges its health; stops it (SIGTERM to the group, SIGKILL
//! after the manifest's `stop_timeout`); restarts it with backoff when it dies; and, after a
//! worker was killed with -9, finds and kills the group its predecessor left running.
//!
//! Group signals are only ever sent while the group leader is our unreaped child (alive or a
//! zombie), so the group's number cannot have been handed to someone else; the leader's exit
//! is observed with `waitid(WNOWAIT)` first, the stragglers killed, and only then is it reaped.
//!
//! Blocking: `start`, `restart` and `reload` return at once; `check_health` takes up to the
//! health check's duration or timeout, `stop` up to `stop_timeout` plus a few seconds, and
//! `kill_orphans` a few seconds. From tokio, run those in `spawn_blocking` (the supervisor is
//! `Send + Sync`; share it in an `Arc` or move it in and out). [`Supervisor::wait_exit`] is
//! async.
//!
//! A worker's loop, sketched:
//!
//! ```text
//! kill_orphans(software_dir)            at boot, before anything is started
//! sup = start(...); check_health()      failed -> stop(), roll back
//! loop {
//!     select! { status = sup.wait_exit() => {}, cmd = commands => { stop or reload } }
//!     sleep(sup.restart_delay()); sup.restart(); check_health()
//! }
//! ```

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use super::health::{self, HealthError};
use super::manifest::{check_env_name, HealthCheck, Manifest};
use super::procfs::{self, PidRecord};
use crate::limits::{
    SOFTWARE_KILL_WAIT, SOFTWARE_RESTART_BACKOFF_MAX, SOFTWARE_RESTART_BACKOFF_MIN,
    SOFTWARE_RESTART_BACKOFF_RESET_AFTER, SUPERVISOR_POLL, SUPERVISOR_WATCH_POLL,
};

/// The pid file in the software directory (pid, process group and start time of the child).
pub const PID_FILE: &str = "running.pid";
/// `PATH` in the child's environment.
pub const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Variables the child never gets from `extra_env`.
const FORBIDDEN_ENV: &[&str] = &["OUTPOST_TOKEN", "NOTIFY_SOCKET"];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// `extra_env` names a variable the child may not get, or an invalid name.
    #[error("extra_env.{name}: {reason}")]
    Env { name: String, reason: String },
    /// The manifest does not match the directory (its `exec[0]` is missing).
    #[error(transparent)]
    Manifest(#[from] super::ManifestError),
    /// The pid file names a group that is still running.
    #[error("software is already running from {dir} (process group {pgid}); stop it or call kill_orphans first")]
    AlreadyRunning { dir: String, pgid: u32 },
}

/// Why the manifest's `config.reload` command did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadCommandError {
    /// The software's log (the command's stdout and stderr) could not be opened.
    #[error("opening {}: {source}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the reload command {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: io::Error,
    },
    /// It exited unsuccessfully; `log_tail` quotes the software's log.
    #[error("the reload command {program} failed ({status}){log_tail}")]
    Failed {
        program: String,
        status: ExitStatus,
        log_tail: String,
    },
    /// Killed after the timeout.
    #[error(
        "the reload command {program} did not finish within {}",
        humantime::format_duration(*timeout)
    )]
    TimedOut { program: String, timeout: Duration },
    #[error("waiting for the reload command: {0}")]
    Wait(#[source] io::Error),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let context = context.into();
    move |source| SupervisorError::Io { context, source }
}

struct ChildState {
    child: Child,
    pid: u32,
    /// Set once the child was reaped.
    status: Option<ExitStatus>,
}

pub struct Supervisor {
    dir: PathBuf,
    pid_file: PathBuf,
    manifest: Manifest,
    log_path: PathBuf,
    extra_env: BTreeMap<String, String>,
    state: Mutex<ChildState>,
    started: Instant,
    backoff: Duration,
    restarts: u32,
}

impl Supervisor {
    /// Starts `manifest.exec` from `installed_dir` (which must be `software_dir/<something>`:
    /// the pid file goes to its parent). The child runs in its own process group, with
    /// `cwd` = the bundle directory, stdin from /dev/null, stdout and stderr appended to
    /// `log_path`, and only `PATH`, `HOME` (= the bundle directory), the manifest's `[env]` and
    /// `extra_env` in its environment. `extra_env` may not hold `OUTPOST_TOKEN` or
    /// `NOTIFY_SOCKET`. Refuses to start while the pid file names a live group.
    pub fn start(
        installed_dir: &Path,
        manifest: &Manifest,
        log_path: &Path,
        extra_env: &BTreeMap<String, String>,
    ) -> Result<Supervisor, SupervisorError> {
        for (name, value) in extra_env {
            let refuse = |reason: String| SupervisorError::Env {
                name: name.clone(),
                reason,
            };
            check_env_name(name).map_err(|e| refuse(e.to_string()))?;
            if FORBIDDEN_ENV.contains(&name.to_ascii_uppercase().as_str()) {
                return Err(refuse("never passed to the software".into()));
            }
            if value.contains('\0') {
                return Err(refuse("a NUL character".into()));
            }
        }
        let dir = std::fs::canonicalize(installed_dir)
            .map_err(io_err(format!("resolving {}", installed_dir.display())))?;
        let software_dir = dir.parent().ok_or_else(|| SupervisorError::Io {
            context: format!("{}", dir.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"),
        })?;
        let pid_file = software_dir.join(PID_FILE);
        if let Some(rec) = procfs::read_pid_file(&pid_file)
            .map_err(io_err(format!("reading {}", pid_file.display())))?
        {
            if rec.group_alive() {
                return Err(SupervisorError::AlreadyRunning {
                    dir: software_dir.display().to_string(),
                    pgid: rec.pgid,
                });
            }
        }
        manifest.check_in_dir(&dir)?;
        let (child, pid) = spawn(&dir, manifest, log_path, extra_env, &pid_file)?;
        Ok(Supervisor {
            dir,
            pid_file,
            manifest: manifest.clone(),
            log_path: log_path.to_owned(),
            extra_env: extra_env.clone(),
            state: Mutex::new(ChildState {
                child,
                pid,
                status: None,
            }),
            started: Instant::now(),
            backoff: SOFTWARE_RESTART_BACKOFF_MIN,
            restarts: 0,
        })
    }

    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The bundle directory the child runs in (resolved: not through `current`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How many times [`Self::restart`] started the software again.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    fn lock(&self) -> MutexGuard<'_, ChildState> {
        // A panic while holding the lock leaves the state as consistent as before it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child's exit status if it has exited, without reaping it.
    fn exit_status(&self) -> Option<ExitStatus> {
        let st = self.lock();
        st.status.or_else(|| exited_nowait(st.pid))
    }

    /// Judges the software's health as its manifest says. Blocking (up to the `alive`
    /// duration, counted from the start, or the `timeout`): run it in `spawn_blocking`.
    /// The error says what was checked and what happened, with the last lines of the log when
    /// the software died.
    pub fn check_health(&self) -> Result<(), HealthError> {
        self.check_health_since(self.started)
    }

    /// [`Self::check_health`] with an `alive` check counted from `since` (after a reload: the
    /// software must stay up that long after it was told).
    pub fn check_health_since(&self, since: Instant) -> Result<(), HealthError> {
        let check = &self.manifest.health.check;
        let timeout = self.manifest.health.timeout;
        match check {
            HealthCheck::Alive(d) => {
                let deadline = since + *d;
                loop {
                    if let Some(status) = self.exit_status() {
                        return Err(self.died(check, status));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(());
                    }
                    std::thread::sleep(SUPERVISOR_POLL.min(deadline - now));
                }
            }
            HealthCheck::Tcp { host, port } => health::retry(
                timeout,
                || self.exit_status(),
                |budget| health::tcp_connect(host, *port, budget),
            )
            .map_err(|e| self.failed(check, timeout, e)),
            HealthCheck::Http(target) => health::retry(
                timeout,
                || self.exit_status(),
                |budget| health::http_get(target, budget),
            )
            .map_err(|e| self.failed(check, timeout, e)),
        }
    }

    fn died(&self, check: &HealthCheck, status: ExitStatus) -> HealthError {
        HealthError::Exited {
            check: check.to_string(),
            program: self.manifest.exec[0].clone(),
            status,
            ran: self.started.elapsed(),
            log_tail: health::log_tail(&self.log_path),
        }
    }

    fn failed(&self, check: &HealthCheck, timeout: Duration, e: health::Failure) -> HealthError {
        match e {
            health::Failure::Exited(status) => self.died(check, status),
            health::Failure::Timeout(last) => HealthError::Timeout {
                check: check.to_string(),
                timeout,
                last,
            },
        }
    }

    /// Non-blocking: the exit status if the software has exited (by itself). Whatever else
    /// of its group still runs is killed, and the child reaped.
    pub fn poll_exit(&self) -> Option<ExitStatus> {
        let mut st = self.lock();
        if let Some(s) = st.status {
            return Some(s);
        }
        exited_nowait(st.pid)?;
        Some(self.finish(&mut st))
    }

    /// Resolves when the software has exited; cancel-safe (it only polls).
    pub async fn wait_exit(&self) -> ExitStatus {
        loop {
            if let Some(s) = self.poll_exit() {
                return s;
            }
            tokio::time::sleep(SUPERVISOR_WATCH_POLL).await;
        }
    }

    /// SIGTERM to the group; SIGKILL once `stop_timeout` has passed with any of it still
    /// running; then reaps the child and removes the pid file. Blocking: run it in
    /// `spawn_blocking`. Returns the child's exit status (also when it had exited already).
    pub fn stop(&mut self) -> Result<ExitStatus, SupervisorError> {
        let timeout = self.manifest.stop_timeout;
        let mut st = self.lock();
        if let Some(s) = st.status {
            return Ok(s);
        }
        let pid = st.pid;
        procfs::signal_group(pid, Signal::TERM).map_err(io_err("SIGTERM to the group"))?;
        if !group_gone(pid, Instant::now() + timeout) {
            tracing::warn!(
                "{} still running {} after SIGTERM; SIGKILL",
                self.manifest.exec[0],
                humantime::format_duration(timeout)
            );
        }
        Ok(self.finish(&mut st))
    }

    /// SIGHUP to the group (the software reloads, if it knows how).
    pub fn reload(&self) -> io::Result<()> {
        let st = self.lock();
        if st.status.is_some() || exited_nowait(st.pid).is_some() {
            return Err(io::Error::other("the software is not running"));
        }
        procfs::signal_group(st.pid, Signal::HUP)
    }

    /// The manifest's `config.reload` command, run to completion in the bundle directory with
    /// the software's environment (its output appended to the log), killed after `timeout`.
    /// Blocking. `Ok` only when it exited 0.
    pub fn run_reload_command(
        &self,
        command: &[String],
        timeout: Duration,
    ) -> Result<(), ReloadCommandError> {
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&self.log_path)
                .map_err(|source| ReloadCommandError::OpenLog {
                    path: self.log_path.clone(),
                    source,
                })
        };
        let program = self.dir.join(&command[0]);
        let mut child = Command::new(&program)
            .args(&command[1..])
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("HOME", &self.dir)
            .envs(&self.manifest.env)
            .envs(&self.extra_env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(open_log()?))
            .stderr(Stdio::from(open_log()?))
            .spawn()
            .map_err(|source| ReloadCommandError::Start {
                program: command[0].clone(),
                source,
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(ReloadCommandError::Failed {
                        program: command[0].clone(),
                        status,
                        log_tail: health::log_tail(&self.log_path),
                    })
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ReloadCommandError::TimedOut {
                        program: command[0].clone(),
                        timeout,
                    });
                }
                Ok(None) => std::thread::sleep(SUPERVISOR_POLL),
                Err(e) => return Err(ReloadCommandError::Wait(e)),
            }
        }
    }

    /// How long to wait before [`Self::restart`]: doubles with each restart from 1 s to 60 s,
    /// back to 1 s for software that had run for a minute.
    pub fn restart_delay(&self) -> Duration {
        backoff(self.backoff, self.started.elapsed()).0
    }

    /// Starts the software again (after it exited: anything of the old group still running is
    /// killed first). Does not sleep: wait [`Self::restart_delay`] before calling it.
    pub fn restart(&mut self) -> Result<(), SupervisorError> {
        let (_, next) = backoff(self.backoff, self.started.elapsed());
        {
            let mut st = self.lock();
            if st.status.is_none() {
                self.finish(&mut st);
            }
        }
        let (child, pid) = spawn(
            &self.dir,
            &self.manifest,
            &self.log_path,
            &self.extra_env,
            &self.pid_file,
        )?;
        *self.lock() = ChildState {
            child,
            pid,
            status: None,
        };
        self.started = Instant::now();
        self.backoff = next;
        self.restarts += 1;
        Ok(())
    }

    /// Kills whatever of the group still runs (SIGKILL while the leader is not yet reaped, so
    /// the group id is still ours), reaps the leader, removes the pid file.
    fn finish(&self, st: &mut ChildState) -> ExitStatus {
        if let Err(e) = procfs::signal_group(st.pid, Signal::KILL) {
            tracing::warn!("SIGKILL to process group {}: {e}", st.pid);
        }
        group_gone(st.pid, Instant::now() + SOFTWARE_KILL_WAIT);
        let status = match st.child.wait() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("reaping {}: {e}", st.pid);
                ExitStatus::from_raw(Signal::KILL.as_raw())
            }
        };
        st.status = Some(status);
        if let Err(e) = procfs::remove_pid_file(&self.pid_file) {
            tracing::warn!("removing {}: {e}", self.pid_file.display());
        }
        status
    }

    /// After a worker was killed (-9) with software running: reads the pid file in
    /// `software_dir`, and if the group it names still runs (the same processes: checked by
    /// start time), SIGKILLs it and waits until it is gone. Removes the pid file. Returns the
    /// group killed. Blocking (a few seconds at most): `spawn_blocking`.
    pub fn kill_orphans(software_dir: &Path) -> io::Result<Option<u32>> {
        let pid_file = software_dir.join(PID_FILE);
        let Some(rec) = procfs::read_pid_file(&pid_file)? else {
            return Ok(None);
        };
        let killed = if rec.group_alive() {
            procfs::signal_group(rec.pgid, Signal::KILL)?;
            let deadline = Instant::now() + SOFTWARE_KILL_WAIT;
            while !procfs::live_members(rec.pgid).is_empty() && Instant::now() < deadline {
                std::thread::sleep(SUPERVISOR_POLL);
            }
            tracing::info!("killed process group {} left by a previous run", rec.pgid);
            Some(rec.pgid)
        } else {
            None
        };
        procfs::remove_pid_file(&pid_file)?;
        Ok(killed)
    }
}

impl Drop for Supervisor {
    /// Software is never left running unsupervised by this process: a supervisor dropped
    /// without `stop` kills its group.
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.status.is_none() {
            self.finish(&mut st);
        }
    }
}

/// (delay before this restart, delay stored for the next one).
fn backoff(current: Duration, ran_for: Duration) -> (Duration, Duration) {
    let delay = if ran_for >= SOFTWARE_RESTART_BACKOFF_RESET_AFTER {
        SOFTWARE_RESTART_BACKOFF_MIN
    } else {
        current
    };
    (delay, (delay * 2).min(SOFTWARE_RESTART_BACKOFF_MAX))
}

fn spawn(
    dir: &Path,
    manifest: &Manifest,
    log_path: &Path,
    extra_env: &BTreeMap<String, String>,
    pid_file: &Path,
) -> Result<(Child, u32), SupervisorError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(log_path)
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let program = dir.join(&manifest.exec[0]);
    let mut cmd = Command::new(&program);
    cmd.args(&manifest.exec[1..])
        .current_dir(dir)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("HOME", dir)
        .envs(&manifest.env)
        .envs(extra_env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", program.display())))?;
    let pid = child.id();
    // The start time names this process across pid reuse; it is there while the child is
    // unreaped, even as a zombie.
    let start = procfs::stat(pid).map_or(0, |s| s.start);
    let rec = PidRecord {
        pid,
        pgid: pid,
        start,
    };
    if let Err(e) = procfs::write_pid_file(pid_file, &rec) {
        let mut child = child;
        let _ = procfs::signal_group(pid, Signal::KILL);
        let _ = child.wait();
        return Err(SupervisorError::Io {
            context: format!("writing {}", pid_file.display()),
            source: e,
        });
    }
    tracing::info!(
        "started {} (pid {pid}) from {}",
        manifest.exec[0],
        dir.display()
    );
    Ok((child, pid))
}

/// The exit status of our child `pid` if it has exited, leaving it unreaped (a zombie), so its
/// pid, and with it the group id, stays ours.
fn exited_nowait(pid: u32) -> Option<ExitStatus> {
    let p = Pid::from_raw(i32::try_from(pid).ok()?)?;
    let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    let st = rustix::process::waitid(WaitId::Pid(p), opts).ok()??;
    let raw = if let Some(code) = st.exit_status() {
        (code & 0xff) << 8
    } else if let Some(sig) = st.terminating_signal() {
        sig | if st.dumped() { 0x80 } else { 0 }
    } else {
        return None;
    };
    Some(ExitStatus::from_raw(raw))
}

/// Waits until the leader `pgid` has exited and no other process of its group runs, or
/// `deadline`; on the deadline, SIGKILLs the group and waits a little more. True when the
/// group was gone before the deadline.
fn group_gone(pgid: u32, deadline: Instant) -> bool {
    let gone = || exited_nowait(pgid).is_some() && procfs::live_members(pgid).is_empty();
    loop {
        if gone() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(SUPERVISOR_POLL.min(deadline - now));
    }
    let _ = procfs::signal_group(pgid, Signal::KILL);
    let until = Instant::now() + SOFTWARE_KILL_WAIT;
    while !gone() && Instant::now() < until {
        std::thread::sleep(SUPERVISOR_POLL);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervisor_can_be_shared_with_blocking_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Supervisor>();
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_resets_after_a_stable_run() {
        let short = Duration::from_secs(2);
        let mut cur = SOFTWARE_RESTART_BACKOFF_MIN;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let (d, next) = backoff(cur, short);
            delays.push(d.as_secs());
            cur = next;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            backoff(
                SOFTWARE_RESTART_BACKOFF_MAX,
                SOFTWARE_RESTART_BACKOFF_RESET_AFTER
            )
            .0,
            SOFTWARE_RESTART_BACKOFF_MIN
        );
    }
}
