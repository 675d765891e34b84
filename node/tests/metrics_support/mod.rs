//! Checks a `/metrics` text with `promtool check metrics` (Debian's `prometheus` package), the
//! linter Prometheus operators run; skipped with a message where promtool is not installed.

use std::io::Write;
use std::process::{Command, Stdio};

/// `None` when promtool is not installed; otherwise its verdict (its complaints on failure).
pub fn promtool_check(role: &str, text: &str) -> Option<Result<(), String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => {
            println!("{role}: promtool check metrics skipped: promtool not installed");
            return None;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool runs");
    if out.status.success() {
        println!("{role}: promtool check metrics: ok");
        Some(Ok(()))
    } else {
        Some(Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Asserts promtool finds nothing to complain about (when it is installed).
pub fn assert_promtool_clean(role: &str, text: &str) {
    if let Some(Err(e)) = promtool_check(role, text) {
        panic!("{role}: promtool check metrics failed:\n{e}\n--- metrics ---\n{text}");
    }
}

/// The value of the first sample line of `name` whose labels contain every `labels` pair
/// (`k="v"`), or `None`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}
