//! Finding `process.args[0]` the way runc does (Go's exec.LookPath), inside
//! the container after pivot_root and the user switch, with the PATH from
//! `process.env`. Error texts match runc's so users recognise them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Used when `process.env` has no PATH.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `strerror` text in lower case, without Rust's "(os error N)" suffix.
pub(crate) fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let s = nix::errno::Errno::from_raw(n).desc();
            let mut c = s.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => s.to_string(),
            }
        }
        None => e.to_string(),
    }
}

fn is_executable(p: &Path) -> Result<(), std::io::Error> {
    let m = std::fs::metadata(p)?;
    if m.is_dir() {
        return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
    }
    if m.permissions().mode() & 0o111 == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EACCES));
    }
    nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).map_err(std::io::Error::from)
}

pub(crate) fn find_executable(arg0: &str, path_env: Option<&str>) -> Result<PathBuf, String> {
    if arg0.contains('/') {
        return match is_executable(Path::new(arg0)) {
            Ok(()) => Ok(PathBuf::from(arg0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "exec {arg0:?}: stat {arg0}: no such file or directory"
            )),
            Err(e) => Err(format!("exec {arg0:?}: {}", errno_text(&e))),
        };
    }
    if !arg0.is_empty() {
        for dir in path_env.unwrap_or(DEFAULT_PATH).split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = Path::new(dir).join(arg0);
            if is_executable(&candidate).is_ok() {
                return Ok(candidate);
            }
        }
    }
    Err(format!("exec {arg0:?}: executable file not found in $PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn lookup() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("tool"), "").unwrap(); // not executable: skipped
        fs::write(b.join("tool"), "").unwrap();
        fs::set_permissions(b.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(a.join("dir")).unwrap();
        let path = format!("{}:{}", a.display(), b.display());

        assert_eq!(
            find_executable("tool", Some(&path)).unwrap(),
            b.join("tool")
        );
        assert_eq!(
            find_executable("nope", Some(&path)).unwrap_err(),
            r#"exec "nope": executable file not found in $PATH"#
        );
        assert_eq!(
            find_executable("dir", Some(&path)).unwrap_err(),
            r#"exec "dir": executable file not found in $PATH"#
        );
        let abs = b.join("tool");
        assert_eq!(find_executable(abs.to_str().unwrap(), None).unwrap(), abs);
        let missing = a.join("missing");
        let m = missing.to_str().unwrap();
        assert_eq!(
            find_executable(m, None).unwrap_err(),
            format!("exec {m:?}: stat {m}: no such file or directory")
        );
        let d = a.join("dir");
        let d = d.to_str().unwrap();
        assert_eq!(
            find_executable(d, None).unwrap_err(),
            format!("exec {d:?}: is a directory")
        );
        assert!(find_executable("", Some(&path)).is_err());
    }
}
