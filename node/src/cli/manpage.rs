//! The man page and shell completions, generated from the command line's own definition
//! (clap_mangen, clap_complete), so they never drift from `--help`. The Debian package build
//! (systemd/deb/build-deb.sh) runs `outpost man` and `outpost completions SHELL` and installs
//! what they print.

use std::io::Write;

use clap::CommandFactory;

use super::{EXIT_FAILED, EXIT_OK};

/// `outpost man`: outpost(1) as roff on stdout.
pub(super) fn man<C: CommandFactory>() -> i32 {
    let cmd = C::command();
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
        eprintln!("error: rendering the man page: {e}");
        return EXIT_FAILED;
    }
    write_stdout(&out)
}

/// `outpost completions SHELL`: the completion script on stdout.
pub(super) fn completions<C: CommandFactory>(shell: clap_complete::Shell) -> i32 {
    let mut cmd = C::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "outpost", &mut out);
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> i32 {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            EXIT_FAILED
        }
    }
}
