//! Resolving a container path (a mount destination) inside the rootfs the
//! way the container will see it: symlinks in the image are followed, but
//! absolute targets restart at the rootfs and ".." stops at it, so a hostile
//! image cannot redirect a mount onto the host (the securejoin idea).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

const MAX_SYMLINKS: usize = 255;

enum Part {
    Root,
    Parent,
    Name(OsString),
}

fn parts(p: &Path) -> VecDeque<Part> {
    p.components()
        .filter_map(|c| match c {
            Component::RootDir | Component::Prefix(_) => Some(Part::Root),
            Component::CurDir => None,
            Component::ParentDir => Some(Part::Parent),
            Component::Normal(n) => Some(Part::Name(n.to_os_string())),
        })
        .collect()
}

/// Returns `root` joined with `unsafe_path` resolved as if `root` were "/".
/// Missing components are appended as they are (they will be created).
pub(crate) fn resolve_in_root(root: &Path, unsafe_path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending = parts(unsafe_path);
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part {
            Part::Root => resolved.clear(),
            Part::Parent => {
                resolved.pop();
            }
            Part::Name(name) => {
                let candidate = resolved.join(&name);
                let full = root.join(&candidate);
                match std::fs::symlink_metadata(&full) {
                    Ok(m) if m.file_type().is_symlink() => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        let target = std::fs::read_link(&full)?;
                        let mut next = parts(&target);
                        next.extend(pending);
                        pending = next;
                    }
                    _ => resolved = candidate,
                }
            }
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn follows_links_inside_root_and_refuses_escapes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../../../../etc", root.join("evil")).unwrap();
        symlink("/", root.join("toroot")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        symlink("usr/lib", root.join("rel")).unwrap();

        let r = |p: &str| resolve_in_root(root, Path::new(p)).unwrap();
        assert_eq!(r("/proc"), root.join("proc"));
        assert_eq!(r("/lib/x"), root.join("usr/lib/x"));
        assert_eq!(r("/rel/y"), root.join("usr/lib/y"));
        assert_eq!(r("/evil/passwd"), root.join("etc/passwd"));
        assert_eq!(r("/../../etc"), root.join("etc"));
        assert_eq!(r("/toroot/dev"), root.join("dev"));
        assert_eq!(r("/a/./b/../c"), root.join("a/c"));
        let e = resolve_in_root(root, Path::new("/loop1/x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }
}
