//! Path rules shared by the packer, the unpacker and the manifest check: what a path inside a
//! bundle may look like, and where a symlink may point. Pure functions over bytes.

use crate::limits::BUNDLE_PATH_NAME_BYTES_MAX;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PathProblem {
    Absolute,
    Parent,
    TooLong(usize),
    Bad(String),
}

/// Splits a path from an archive (or a manifest) into its components: a leading `./`, `.` and
/// empty components and a trailing `/` are dropped. An empty result names the bundle root.
pub(crate) fn components(raw: &[u8], max: usize) -> Result<Vec<&str>, PathProblem> {
    if raw.len() > max {
        return Err(PathProblem::TooLong(raw.len()));
    }
    if raw.contains(&0) {
        return Err(PathProblem::Bad("a NUL byte in the path".into()));
    }
    if raw.first() == Some(&b'/') {
        return Err(PathProblem::Absolute);
    }
    let text =
        std::str::from_utf8(raw).map_err(|_| PathProblem::Bad("the path is not UTF-8".into()))?;
    let mut out = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathProblem::Parent),
            name if name.len() > BUNDLE_PATH_NAME_BYTES_MAX => {
                return Err(PathProblem::Bad(format!(
                    "a name of {} bytes (at most {BUNDLE_PATH_NAME_BYTES_MAX})",
                    name.len()
                )))
            }
            name => out.push(name),
        }
    }
    Ok(out)
}

/// Why a symlink's target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LinkProblem {
    #[error("empty target")]
    Empty,
    #[error("a target of {len} bytes (at most {max})")]
    TooLong { len: usize, max: usize },
    #[error("a NUL byte in the target")]
    Nul,
    #[error("the target is absolute")]
    Absolute,
    #[error("the target is not UTF-8")]
    NotUtf8,
    #[error("`..` after a name (only leading `..` are allowed)")]
    ParentAfterName,
    #[error("the target leaves the bundle")]
    LeavesBundle,
}

/// Why a path inside an unpacked bundle cannot be reached without going through a symlink.
/// `shown` is the offending prefix, relative to the bundle root.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalkProblem {
    #[error("{shown} is a symlink; paths may not go through one")]
    Symlink { shown: String },
    #[error("{shown} is not a directory")]
    NotDir { shown: String },
    #[error("directory {shown} is not in the bundle")]
    Missing { shown: String },
    #[error("{shown}: {source}")]
    Io {
        shown: String,
        #[source]
        source: io::Error,
    },
}

/// Checks that a symlink at `link` (its components, not empty) pointing to `target` stays inside
/// the bundle. The target is resolved relative to the link's directory; it may climb with
/// leading `..` components (no higher than the bundle root) and then only descend. A `..` after
/// a name is refused, because the name may itself be a symlink, and then `..` would climb from
/// wherever that one points.
pub(crate) fn check_link_target(
    link: &[&str],
    target: &[u8],
    max: usize,
) -> Result<(), LinkProblem> {
    if target.is_empty() {
        return Err(LinkProblem::Empty);
    }
    if target.len() > max {
        return Err(LinkProblem::TooLong {
            len: target.len(),
            max,
        });
    }
    if target.contains(&0) {
        return Err(LinkProblem::Nul);
    }
    if target.first() == Some(&b'/') {
        return Err(LinkProblem::Absolute);
    }
    let text = std::str::from_utf8(target).map_err(|_| LinkProblem::NotUtf8)?;
    let depth = link.len().saturating_sub(1);
    let mut ups = 0usize;
    let mut named = false;
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." if named => {
                return Err(LinkProblem::ParentAfterName);
            }
            ".." => {
                ups += 1;
                if ups > depth {
                    return Err(LinkProblem::LeavesBundle);
                }
            }
            _ => named = true,
        }
    }
    Ok(())
}

/// `root` joined with `parts`, after checking with `lstat` that every component but the last is
/// a real directory (not a symlink), so that nothing is ever reached through a link.
pub(crate) fn walk_no_symlinks(root: &Path, parts: &[&str]) -> Result<PathBuf, WalkProblem> {
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        if i + 1 == parts.len() {
            break;
        }
        let shown = parts[..=i].join("/");
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => return Err(WalkProblem::Symlink { shown }),
            Ok(_) => return Err(WalkProblem::NotDir { shown }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(WalkProblem::Missing { shown })
            }
            Err(source) => return Err(WalkProblem::Io { shown, source }),
        }
    }
    Ok(path)
}

/// The normalised mode of a regular file: 0755 if any execute bit is set, else 0644.
pub(crate) fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Mode of directories in a bundle.
pub(crate) const DIR_MODE: u32 = 0o755;

/// Sets exactly `mode`, whatever the umask made of it at creation.
pub(crate) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// At most 200 characters of a path for an error message.
pub(crate) fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    if s.chars().count() > 200 {
        s.chars().take(200).collect()
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_normalise_and_refuse() {
        assert_eq!(components(b"./a//b/./c/", 100).unwrap(), ["a", "b", "c"]);
        assert!(components(b"./", 100).unwrap().is_empty());
        assert_eq!(components(b"/etc/passwd", 100), Err(PathProblem::Absolute));
        assert_eq!(components(b"a/../b", 100), Err(PathProblem::Parent));
        assert_eq!(components(b"..", 100), Err(PathProblem::Parent));
        assert_eq!(components(b"abcdef", 3), Err(PathProblem::TooLong(6)));
        assert!(matches!(
            components(b"a\xff", 100),
            Err(PathProblem::Bad(_))
        ));
        assert!(matches!(
            components("x".repeat(256).as_bytes(), 1000),
            Err(PathProblem::Bad(_))
        ));
    }

    #[test]
    fn link_targets_stay_inside() {
        assert!(check_link_target(&["a"], b"b", 100).is_ok());
        assert!(check_link_target(&["d", "l"], b"../x/y", 100).is_ok());
        assert!(check_link_target(&["d", "l"], b"..", 100).is_ok());
        assert!(check_link_target(&["d", "l"], b".", 100).is_ok());
        assert!(check_link_target(&["l"], b"..", 100).is_err());
        assert!(check_link_target(&["d", "l"], b"../..", 100).is_err());
        assert!(check_link_target(&["d", "l"], b"/etc", 100).is_err());
        assert!(check_link_target(&["d", "e", "l"], b"x/../..", 100).is_err());
        assert!(check_link_target(&["l"], b"", 100).is_err());
    }
}
