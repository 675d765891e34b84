//! The operator's offline and maintenance commands: `outpost backup` (through a running node's
//! API, or `--offline` from a stopped node's data directory) and `outpost db check`.

use std::path::Path;

use super::client::ApiClient;
use super::{ApiOpts, EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::store::{OpenError, Store, DB_FILE};

/// `outpost backup --out FILE`: the node writes a consistent copy and streams it.
pub(super) fn backup_online(opts: &ApiOpts, out: &Path, as_json: bool) -> i32 {
    let token = match &opts.token {
        Some(t) => Some(t.clone()),
        None => crate::config::read_token(&opts.data_dir).ok(),
    };
    let client = match ApiClient::new(&opts.api, token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match client.download(&["v1", "backup"], out, crate::http::BACKUP_HASH_HEADER) {
        Ok(d) if as_json => {
            let answer = serde_json::json!({
                "file": out.display().to_string(), "bytes": d.bytes, "blake3": d.blake3,
            });
            println!("{}", super::commands::pretty(&answer));
            EXIT_OK
        }
        Ok(d) => {
            println!(
                "wrote {} ({} bytes, blake3 {})",
                out.display(),
                d.bytes,
                d.blake3
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: backup: {e}");
            if matches!(&e, super::client::ClientError::Status { status, .. } if status.as_u16() == 401)
            {
                eprintln!(
                    "hint: the token comes from --token, else OUTPOST_TOKEN, else the `token` \
                     file in --data-dir (else the config's data_dir); token looked for in {}",
                    opts.data_dir.display()
                );
            }
            EXIT_FAILED
        }
    }
}

/// Refuses a directory without a database rather than creating one.
fn existing_db(data_dir: &Path) -> Result<(), i32> {
    let path = data_dir.join(DB_FILE);
    if path.is_file() {
        return Ok(());
    }
    eprintln!(
        "error: --data-dir: {} does not exist (not an outpost data directory?)",
        path.display()
    );
    Err(EXIT_USAGE)
}

/// `outpost backup --offline --data-dir DIR --out FILE`: copies a stopped node's database.
pub(super) fn backup_offline(data_dir: &Path, out: &Path, as_json: bool) -> i32 {
    if let Err(code) = existing_db(data_dir) {
        return code;
    }
    let store = match Store::open(data_dir) {
        Ok(s) => s,
        Err(e @ OpenError::Locked { .. }) => {
            eprintln!("error: {e}");
            eprintln!("hint: back up a running node through its API: outpost backup --out FILE");
            return EXIT_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    let tmp = super::files::temp_beside(out);
    let _ = std::fs::remove_file(&tmp);
    let written = store
        .backup_to(&tmp)
        .map_err(|e| e.to_string())
        .and_then(|info| {
            let f = std::fs::File::open(&tmp).map_err(|e| e.to_string())?;
            super::files::commit(f, &tmp, out).map_err(|e| e.to_string())?;
            Ok(info)
        });
    match written {
        Ok(info) if as_json => {
            let answer = serde_json::json!({
                "file": out.display().to_string(), "bytes": info.bytes, "rows": info.rows,
            });
            println!("{}", super::commands::pretty(&answer));
            EXIT_OK
        }
        Ok(info) => {
            println!(
                "wrote {} ({} bytes, {} rows)",
                out.display(),
                info.bytes,
                info.rows
            );
            EXIT_OK
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            eprintln!("error: backup to {}: {e}", out.display());
            EXIT_FAILED
        }
    }
}

/// `outpost db check --data-dir DIR`.
pub(super) fn db_check(data_dir: &Path) -> i32 {
    if let Err(code) = existing_db(data_dir) {
        return code;
    }
    let report = match crate::store::check::check(data_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    if report.ok() {
        println!("ok: {}", report.summary());
        return EXIT_OK;
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    if report.more_problems > 0 {
        println!("problem: ... and {} more", report.more_problems);
    }
    eprintln!(
        "error: {}: {} problem(s) found",
        data_dir.join(DB_FILE).display(),
        report.problems.len() as u64 + report.more_problems
    );
    EXIT_FAILED
}
