//! The supervisor with real child processes (the fixture bundles, POSIX sh): a healthy start
//! and a prompt stop on SIGTERM, a failing health check that says why, SIGKILL after the stop
//! timeout, restart with backoff, orphans of a killed worker found and killed, and a clean
//! environment. Every wait is on observable state (files, exit status, /proc), never a guess.

mod bundle_support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bundle_support::{fixture, live_group_members, read_state, wait_for, TempDir};
use outpost::bundle::{pack, Installed, Installer, Manifest, Supervisor, PID_FILE};

const LIMIT: Duration = Duration::from_secs(20);
/// Set in a re-executed copy of this test binary to make `helper_process` do its part.
const HELPER_ENV: &str = "OUTPOST_BUNDLE_TEST_HELPER";

/// Packs and installs a fixture (or any bundle directory) into `t/software`.
fn install(t: &TempDir, src: &Path) -> Installed {
    let name = src.file_name().unwrap().to_string_lossy().into_owned();
    let file = t.join(&format!("{name}.bundle"));
    let info = pack(src, &file).unwrap();
    let mut inst = Installer::new(t.join("software")).unwrap();
    inst.install(&info.bundle_id, std::fs::File::open(&file).unwrap())
        .unwrap()
}

/// A bundle directory made on the spot: `bin/start` is `script`.
fn custom_bundle(t: &TempDir, name: &str, script: &str, manifest_extra: &str) -> PathBuf {
    let dir = t.join(name);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let start = dir.join("bin/start");
    std::fs::write(&start, script).unwrap();
    std::fs::set_permissions(&start, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("outpost-bundle.toml"),
        format!(
            "service = \"voice\"\nversion = \"0.1.0\"\nexec = [\"bin/start\"]\n{manifest_extra}"
        ),
    )
    .unwrap();
    dir
}

fn state_env(path: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([("SAMPLE_STATE_FILE".to_string(), path.display().to_string())])
}

fn pid_of(state: &Path) -> u32 {
    let s = wait_for("the state file", LIMIT, || read_state(state));
    s["pid"].parse().unwrap()
}

#[test]
fn voice_starts_healthy_reloads_and_stops_on_sigterm() {
    let t = TempDir::new("sup-voice");
    let installed = install(&t, &fixture("voice"));
    let state = t.join("voice.state");
    let log = t.join("voice.log");
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &log,
        &state_env(&state),
    )
    .unwrap();
    let pid = sup.pid();
    assert!(t.join("software").join(PID_FILE).is_file());
    sup.check_health().expect("healthy");
    let s = wait_for("the state file", LIMIT, || read_state(&state));
    assert_eq!(s["service"], "voice");
    assert_eq!(s["pid"], pid.to_string());

    sup.reload().unwrap();
    wait_for("the reload", LIMIT, || {
        read_state(&state).filter(|s| s["reloads"] == "1")
    });

    let started = Instant::now();
    let status = sup.stop().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "voice exited with {status}");
    assert!(
        took < installed.manifest.stop_timeout,
        "stopping took {took:?}, past the stop timeout"
    );
    assert!(live_group_members(pid).is_empty(), "the group still runs");
    assert!(!t.join("software").join(PID_FILE).exists());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("voice: started"), "{text}");
    assert!(text.contains("SIGTERM, exiting"), "{text}");
    // Stopping twice answers the same status.
    assert_eq!(sup.stop().unwrap(), status);
}

#[test]
fn broken_fails_its_health_check_with_the_exit_status() {
    let t = TempDir::new("sup-broken");
    let installed = install(&t, &fixture("broken"));
    let log = t.join("broken.log");
    let mut sup =
        Supervisor::start(&installed.dir, &installed.manifest, &log, &BTreeMap::new()).unwrap();
    let reason = sup.check_health().unwrap_err().to_string();
    assert!(reason.contains("alive"), "{reason}");
    assert!(reason.contains("exit status: 1"), "{reason}");
    assert!(reason.contains("broken: cannot start"), "{reason}");
    assert_eq!(sup.stop().unwrap().code(), Some(1));
}

#[test]
fn tcp_health_check_fails_with_what_was_tried() {
    let t = TempDir::new("sup-tcp");
    // A port nobody listens on: bind one, note it, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = custom_bundle(
        &t,
        "tcp",
        "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 1 & wait $!; done\n",
        &format!("[health]\ntcp = \"127.0.0.1:{port}\"\ntimeout = \"300ms\"\n"),
    );
    let installed = install(&t, &src);
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &BTreeMap::new(),
    )
    .unwrap();
    let reason = sup.check_health().unwrap_err().to_string();
    assert!(
        reason.contains(&format!("tcp 127.0.0.1:{port}")),
        "{reason}"
    );
    assert!(reason.contains("no success within 300ms"), "{reason}");

    // Listening now: healthy.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    sup.check_health().expect("healthy");
    drop(listener);
    assert!(sup.stop().unwrap().success());
}

#[test]
fn http_health_check_wants_a_2xx() {
    let t = TempDir::new("sup-http");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let src = custom_bundle(
        &t,
        "http",
        "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 1 & wait $!; done\n",
        &format!("[health]\nhttp = \"http://127.0.0.1:{port}/health\"\ntimeout = \"5s\"\n"),
    );
    let installed = install(&t, &src);
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &BTreeMap::new(),
    )
    .unwrap();
    // Answers 503 twice, then 200: the check retries until the 200.
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut requests = Vec::new();
        for answer in [
            "503 Service Unavailable",
            "503 Service Unavailable",
            "200 OK",
        ] {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            requests.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            write!(s, "HTTP/1.0 {answer}\r\nContent-Length: 0\r\n\r\n").unwrap();
        }
        requests
    });
    sup.check_health().expect("healthy");
    let requests = server.join().unwrap();
    assert!(
        requests[0].starts_with("GET /health HTTP/1.0\r\n"),
        "{requests:?}"
    );
    assert!(sup.stop().unwrap().success());
}

#[test]
fn sigterm_ignored_is_sigkilled_after_stop_timeout() {
    let t = TempDir::new("sup-stubborn");
    let src = custom_bundle(
        &t,
        "stubborn",
        "#!/bin/sh\ntrap '' TERM\nprintf 'service=stubborn\\npid=%s\\nreloads=0\\n' $$ > \"$SAMPLE_STATE_FILE\"\n\
         while :; do sleep 1 & wait $!; done\n",
        "stop_timeout = \"1s\"\n",
    );
    let installed = install(&t, &src);
    let state = t.join("state");
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &state_env(&state),
    )
    .unwrap();
    let pid = pid_of(&state);
    assert_eq!(pid, sup.pid());
    let started = Instant::now();
    let status = sup.stop().unwrap();
    let took = started.elapsed();
    assert_eq!(status.signal(), Some(9), "{status}");
    assert!(
        took >= Duration::from_secs(1),
        "killed after {took:?}, before the timeout"
    );
    assert!(live_group_members(pid).is_empty(), "the group still runs");
}

#[test]
fn dead_software_is_restarted_with_backoff() {
    let t = TempDir::new("sup-restart");
    let installed = install(&t, &fixture("messaging"));
    let state = t.join("state");
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &state_env(&state),
    )
    .unwrap();
    let first = pid_of(&state);
    assert_eq!(sup.poll_exit(), None);

    // It dies (killed from outside).
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let status = rt
        .block_on(async { tokio::time::timeout(LIMIT, sup.wait_exit()).await })
        .expect("the exit is noticed");
    assert_eq!(status.signal(), Some(9));
    assert!(live_group_members(first).is_empty());
    assert!(!t.join("software").join(PID_FILE).exists());

    assert_eq!(sup.restart_delay(), Duration::from_secs(1));
    std::fs::remove_file(&state).unwrap();
    sup.restart().unwrap();
    assert_eq!(sup.restarts(), 1);
    let second = pid_of(&state);
    assert_ne!(second, first);
    assert_eq!(second, sup.pid());
    assert_eq!(sup.restart_delay(), Duration::from_secs(2));
    assert!(t.join("software").join(PID_FILE).is_file());
    assert!(sup.stop().unwrap().success());
}

#[test]
fn start_refuses_while_a_group_runs() {
    let t = TempDir::new("sup-twice");
    let installed = install(&t, &fixture("voice"));
    let state = t.join("state");
    let mut sup = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &state_env(&state),
    )
    .unwrap();
    pid_of(&state);
    let e = Supervisor::start(
        &installed.dir,
        &installed.manifest,
        &t.join("log"),
        &BTreeMap::new(),
    )
    .err()
    .expect("a second start is refused");
    assert!(e.to_string().contains("already running"), "{e}");
    sup.stop().unwrap();
}

#[test]
fn orphans_of_a_killed_worker_are_killed() {
    let t = TempDir::new("sup-orphans");
    let installed = install(&t, &fixture("voice"));
    let state = t.join("state");
    // A "worker" (this test binary, re-executed) starts the software and dies as with kill -9.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "orphan")
        .env("HELPER_DIR", &installed.dir)
        .env("HELPER_STATE", &state)
        .status()
        .unwrap();
    assert!(!status.success(), "the helper was meant to abort: {status}");
    let pid = pid_of(&state);
    assert!(
        !live_group_members(pid).is_empty(),
        "the orphaned software should still run"
    );
    let sw = t.join("software");
    assert!(sw.join(PID_FILE).is_file());

    assert_eq!(Supervisor::kill_orphans(&sw).unwrap(), Some(pid));
    assert!(live_group_members(pid).is_empty(), "the orphans still run");
    assert!(!sw.join(PID_FILE).exists());
    assert_eq!(Supervisor::kill_orphans(&sw).unwrap(), None);
}

#[test]
fn kill_orphans_leaves_a_reused_pid_alone() {
    let t = TempDir::new("sup-reuse");
    let sw = t.join("software");
    std::fs::create_dir_all(&sw).unwrap();
    // A process in a group of its own, recorded with another start time: not ours.
    let mut other = std::process::Command::new("sleep");
    std::os::unix::process::CommandExt::process_group(&mut other, 0);
    let mut other = other.arg("60").spawn().unwrap();
    let pid = other.id();
    std::fs::write(
        sw.join(PID_FILE),
        format!("pid={pid}\npgid={pid}\nstart=1\n"),
    )
    .unwrap();
    assert_eq!(Supervisor::kill_orphans(&sw).unwrap(), None);
    assert_eq!(
        other.try_wait().unwrap(),
        None,
        "an unrelated process was killed"
    );
    assert!(!sw.join(PID_FILE).exists());
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn child_environment_is_clean() {
    let t = TempDir::new("sup-env");
    let src = custom_bundle(
        &t,
        "env",
        "#!/bin/sh\nenv > \"$ENV_DUMP.tmp\" && mv \"$ENV_DUMP.tmp\" \"$ENV_DUMP\"\n\
         trap 'exit 0' TERM\nwhile :; do sleep 1 & wait $!; done\n",
        "[env]\nFROM_MANIFEST = \"yes\"\n",
    );
    let installed = install(&t, &src);
    let dump = t.join("env.dump");
    // The "worker" runs with OUTPOST_TOKEN and NOTIFY_SOCKET in its own environment.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "env")
        .env("HELPER_DIR", &installed.dir)
        .env("HELPER_STATE", &dump)
        .env("OUTPOST_TOKEN", "secret-token")
        .env("NOTIFY_SOCKET", "/run/systemd/notify")
        .env("SOMETHING_ELSE", "inherited?")
        .status()
        .unwrap();
    assert!(status.success(), "helper: {status}");
    let text = std::fs::read_to_string(&dump).unwrap();
    let env: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    for forbidden in [
        "OUTPOST_TOKEN",
        "NOTIFY_SOCKET",
        "SOMETHING_ELSE",
        HELPER_ENV,
    ] {
        assert!(
            !env.contains_key(forbidden),
            "{forbidden} reached the child:\n{text}"
        );
    }
    assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
    assert_eq!(
        Path::new(env["HOME"]),
        std::fs::canonicalize(&installed.dir).unwrap()
    );
    assert_eq!(env["FROM_MANIFEST"], "yes");
    assert_eq!(env["FROM_WORKER"], "1");
    // Whatever else is there, the shell made up itself.
    let expected = ["PATH", "HOME", "FROM_MANIFEST", "FROM_WORKER", "ENV_DUMP"];
    let shell_own = ["PWD", "OLDPWD", "SHLVL", "_"];
    for k in env.keys() {
        assert!(
            expected.contains(k) || shell_own.contains(k),
            "unexpected {k} in the child's environment:\n{text}"
        );
    }

    // The worker cannot hand them over explicitly either.
    let manifest: &Manifest = &installed.manifest;
    for name in ["OUTPOST_TOKEN", "NOTIFY_SOCKET"] {
        let e = Supervisor::start(
            &installed.dir,
            manifest,
            &t.join("log"),
            &BTreeMap::from([(name.to_string(), "x".to_string())]),
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains(name), "{e}");
    }
}

/// Not a test of its own: the part of another test that runs in a re-executed copy of this
/// binary (a stand-in for a worker process). Does nothing unless `HELPER_ENV` is set.
#[test]
fn helper_process() {
    let Ok(role) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var("HELPER_DIR").unwrap());
    let out = PathBuf::from(std::env::var("HELPER_STATE").unwrap());
    let manifest = Manifest::load(&dir).unwrap();
    let log = dir.parent().unwrap().parent().unwrap().join("helper.log");
    match role.as_str() {
        "orphan" => {
            let sup = Supervisor::start(&dir, &manifest, &log, &state_env(&out)).unwrap();
            pid_of(&out);
            // Killed without a chance to clean up, as by kill -9.
            std::mem::forget(sup);
            std::process::abort();
        }
        "env" => {
            let extra = BTreeMap::from([
                ("ENV_DUMP".to_string(), out.display().to_string()),
                ("FROM_WORKER".to_string(), "1".to_string()),
            ]);
            let mut sup = Supervisor::start(&dir, &manifest, &log, &extra).unwrap();
            wait_for("the env dump", LIMIT, || out.is_file().then_some(()));
            sup.stop().unwrap();
        }
        other => panic!("unknown helper role {other}"),
    }
}
