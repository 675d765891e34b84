//! Shared by the `ops_*` tests: one real `outpost` datacenter process in a directory of its own,
//! on ports the kernel picks, and waits on what it shows (a log line, a socket message) with a
//! generous deadline rather than guessed sleeps.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");
/// Deadline of every wait: generous, the machine is shared.
pub const WAIT: Duration = Duration::from_secs(90);

pub struct Node {
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// A fresh directory for one test.
pub fn test_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "outpost-{label}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

/// A datacenter config on kernel-chosen ports.
pub fn config_text(name: &str, data_dir: &Path, extra: &str) -> String {
    format!(
        "role = \"datacenter\"\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
         api = \"127.0.0.1:0\"\n{extra}\n",
        data_dir.display()
    )
}

impl Node {
    /// `outpost init`, then a config; not started.
    pub fn init(dir: &Path, name: &str, extra_config: &str) -> Node {
        let data_dir = dir.join(name);
        let out = Command::new(BIN)
            .args(["init", "--role", "datacenter", "--name", name, "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.join(format!("{name}.toml"));
        fs::write(&config, config_text(name, &data_dir, extra_config)).unwrap();
        Node {
            dir: dir.to_owned(),
            data_dir,
            log: dir.join(format!("{name}.log")),
            config,
            child: None,
        }
    }

    /// `outpost run --config` with `env` added and the supervisor variables of the test runner
    /// removed.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("OUTPOST_TOKEN")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig}");
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `parts`, after byte `from`;
    /// returns that line.
    pub fn wait_log(&mut self, from: usize, parts: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if let Some(line) = text
                .get(from..)
                .unwrap_or("")
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_owned();
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("outpost exited ({st}) before logging {parts:?}:\n{text}");
            }
            assert!(
                start.elapsed() < WAIT,
                "no log line with {parts:?} within {WAIT:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API address and token, once the node logged that it is ready.
    pub fn api(&mut self) -> (String, String) {
        let line = self.wait_log(0, &["ready", "api="]);
        let api = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("api="))
            .unwrap()
            .to_owned();
        let token = fs::read_to_string(self.data_dir.join("token"))
            .unwrap()
            .trim()
            .to_owned();
        (format!("http://{api}"), token)
    }

    /// Waits for the process to exit (after a signal).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("started");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                start.elapsed() < WAIT,
                "outpost did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the binary to completion; returns (exit code, stdout, stderr).
pub fn outpost(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("OUTPOST_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
