//! Unpacking a layer tar into an overlayfs lowerdir.
//!
//! The extractor is our own rather than `tar::Archive::unpack` because overlayfs needs whiteouts
//! converted (`.wh.NAME` → 0:0 char device, `.wh..wh..opq` → `trusted.overlay.opaque=y`) and
//! because layers are untrusted: every entry is checked so nothing is ever created outside the
//! layer directory, neither by `..`/absolute names, nor through a symlink planted by an earlier
//! entry (`evil -> /etc`, then `evil/passwd`), nor by a hardlink to a file outside the layer.
//!
//! The uncompressed stream is hashed while it is read and must match the config's diff_id; the
//! layer is extracted into a temporary directory and renamed into place only if everything
//! checked out, so a half-written or unverified layer is never found under its final name.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};

use crate::error::LayerError;

const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// Unpacks `blob` (gzip, zstd or plain tar, detected by magic bytes) into `dest` via `tmp`.
/// If another pull finished the same layer first, its result is kept and ours discarded.
pub(crate) fn unpack_layer(
    blob: &Path,
    expected_diff_id: &str,
    tmp: &Path,
    dest: &Path,
) -> Result<(), LayerError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayerError::Io { path, source }
    };
    fs::create_dir(tmp).map_err(io_err(tmp))?;
    let result = (|| {
        let file = File::open(blob).map_err(io_err(blob))?;
        let reader = decompressor(file).map_err(LayerError::Archive)?;
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
        };
        Extractor::new(tmp).extract(&mut hashing)?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != expected_diff_id {
            return Err(LayerError::DiffIdMismatch {
                expected: expected_diff_id.to_string(),
                actual,
            });
        }
        // Make the content durable before the rename publishes it as complete.
        let dir = File::open(tmp).map_err(io_err(tmp))?;
        nix::unistd::syncfs(&dir).map_err(|e| LayerError::Io {
            path: tmp.to_path_buf(),
            source: e.into(),
        })?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(tmp, dest) {
        let _ = fs::remove_dir_all(tmp);
        // Lost a race with a concurrent unpack of the same layer: theirs is just as good.
        if !dest.is_dir() {
            return Err(LayerError::Io {
                path: dest.to_path_buf(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Places the raw wasm blob `blob` (digest `digest`) as the regular file `name` (mode 0755, at
/// the root) of a new layer directory `dest`, via `tmp`; the content is hashed while copied and
/// must still match `digest`. Same publication rules as [`unpack_layer`].
pub(crate) fn place_wasm(
    blob: &Path,
    digest: &str,
    name: &str,
    tmp: &Path,
    dest: &Path,
) -> Result<(), LayerError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayerError::Io { path, source }
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(LayerError::UnsafePath {
            entry: name.to_string(),
        });
    }
    fs::create_dir(tmp).map_err(io_err(tmp))?;
    let result = (|| {
        let mut src = HashingReader {
            inner: File::open(blob).map_err(io_err(blob))?,
            hasher: Sha256::new(),
        };
        let target = tmp.join(name);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&target)
            .map_err(io_err(&target))?;
        io::copy(&mut src, &mut out).map_err(io_err(&target))?;
        // The umask may have narrowed the mode given at creation.
        out.set_permissions(Permissions::from_mode(0o755))
            .map_err(io_err(&target))?;
        let actual = format!("sha256:{}", hex::encode(src.hasher.finalize()));
        if actual != digest {
            return Err(LayerError::WasmDigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        out.sync_all().map_err(io_err(&target))?;
        File::open(tmp)
            .and_then(|d| d.sync_all())
            .map_err(io_err(tmp))
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(tmp, dest) {
        let _ = fs::remove_dir_all(tmp);
        if !dest.is_dir() {
            return Err(LayerError::Io {
                path: dest.to_path_buf(),
                source: e,
            });
        }
    }
    Ok(())
}

pub(crate) fn decompressor(file: File) -> io::Result<Box<dyn Read>> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader)?)
    } else {
        Box::new(reader)
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Entry name relative to the layer root, or `None` if it is absolute or climbs with `..`.
pub(crate) fn clean_path(raw: &[u8]) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Metadata carried in PAX extended headers.
#[derive(Default)]
struct Pax {
    xattrs: Vec<(OsString, Vec<u8>)>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, i64)>,
}

fn parse_pax_time(v: &str) -> Option<(i64, i64)> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some((secs, nanos))
}

struct Extractor<'a> {
    root: &'a Path,
    /// Directory mtimes are set last: creating entries inside a directory bumps its mtime.
    dir_times: Vec<(PathBuf, i64, i64)>,
}

impl<'a> Extractor<'a> {
    fn new(root: &'a Path) -> Self {
        Extractor {
            root,
            dir_times: Vec::new(),
        }
    }

    fn extract<R: Read>(mut self, reader: R) -> Result<(), LayerError> {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(LayerError::Archive)? {
            let mut entry = entry.map_err(LayerError::Archive)?;
            self.entry(&mut entry)?;
        }
        // The diff_id covers the whole stream, including the end-of-archive blocks and any
        // padding after them, which the tar reader stops short of.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(LayerError::Archive)?;
        for (path, secs, nanos) in self.dir_times.iter().rev() {
            set_mtime(path, *secs, *nanos).map_err(|source| LayerError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let entry_err = |name: &str| {
            let entry = name.to_string();
            move |source| LayerError::Entry { entry, source }
        };
        let rel = clean_path(&raw).ok_or_else(|| LayerError::UnsafePath {
            entry: name.clone(),
        })?;
        let pax = read_pax(entry).map_err(entry_err(&name))?;

        // The layer root itself (`./`): only its metadata matters.
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                let root = self.root.to_path_buf();
                self.apply_metadata(&root, entry.header(), &pax, Kind::Dir)
                    .map_err(entry_err(&name))?;
            }
            return Ok(());
        }

        let file_name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        if file_name == OPAQUE_MARKER.as_bytes() {
            let dir = self.ensure_parent(&rel, &name)?;
            return xattr::set(&dir, "trusted.overlay.opaque", b"y").map_err(entry_err(&name));
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // Other `.wh..wh.` names are AUFS bookkeeping, meaningless to overlayfs.
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(LayerError::UnsafePath { entry: name });
            }
            let target = self
                .ensure_parent(&rel, &name)?
                .join(OsStr::from_bytes(hidden));
            clear(&target, false).map_err(entry_err(&name))?;
            return mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|e| {
                LayerError::Entry {
                    entry: name.clone(),
                    source: e.into(),
                }
            });
        }

        self.ensure_parent(&rel, &name)?;
        let target = self.root.join(&rel);
        let header = entry.header().clone();
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                clear(&target, false).map_err(entry_err(&name))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(entry_err(&name))?;
                copy_data(entry, &mut file, &name)?;
                drop(file);
                self.apply_metadata(&target, &header, &pax, Kind::File)
                    .map_err(entry_err(&name))?;
            }
            T::Directory => {
                if !clear(&target, true).map_err(entry_err(&name))? {
                    fs::create_dir(&target).map_err(entry_err(&name))?;
                }
                self.apply_metadata(&target, &header, &pax, Kind::Dir)
                    .map_err(entry_err(&name))?;
            }
            T::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| LayerError::Entry {
                        entry: name.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidData, "symlink has no target"),
                    })?
                    .into_owned();
                clear(&target, false).map_err(entry_err(&name))?;
                // Stored verbatim: symlinks are resolved inside the container's root at run
                // time, never by us.
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(entry_err(&name))?;
                self.apply_metadata(&target, &header, &pax, Kind::Symlink)
                    .map_err(entry_err(&name))?;
            }
            T::Link => {
                let link = entry.link_name_bytes().map(|l| l.into_owned());
                let link_name =
                    String::from_utf8_lossy(link.as_deref().unwrap_or_default()).into_owned();
                let outside = || LayerError::HardlinkOutside {
                    entry: name.clone(),
                    target: link_name.clone(),
                };
                let link_rel = link
                    .as_deref()
                    .and_then(clean_path)
                    .filter(|p| !p.as_os_str().is_empty())
                    .ok_or_else(outside)?;
                // link(2) resolves symlinks in the directories of its source path, so those must
                // all be real directories of this layer; the final component may be anything but
                // a directory, and link(2) does not follow it if it is a symlink.
                if self.symlink_in_parents(&link_rel).is_some() {
                    return Err(outside());
                }
                let source = self.root.join(&link_rel);
                match fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(outside()),
                }
                if source != target {
                    clear(&target, false).map_err(entry_err(&name))?;
                    fs::hard_link(&source, &target).map_err(entry_err(&name))?;
                }
            }
            T::Char | T::Block | T::Fifo => {
                let sflag = match kind {
                    T::Char => SFlag::S_IFCHR,
                    T::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                clear(&target, false).map_err(entry_err(&name))?;
                mknod(
                    &target,
                    sflag,
                    Mode::empty(),
                    makedev(u64::from(major), u64::from(minor)),
                )
                .map_err(|e| LayerError::Entry {
                    entry: name.clone(),
                    source: e.into(),
                })?;
                self.apply_metadata(&target, &header, &pax, Kind::File)
                    .map_err(entry_err(&name))?;
            }
            other => {
                return Err(LayerError::UnsupportedEntry {
                    entry: name,
                    kind: format!("{other:?}"),
                })
            }
        }
        Ok(())
    }

    /// First path prefix of `rel`'s parent directories that is a symlink, if any.
    fn symlink_in_parents(&self, rel: &Path) -> Option<PathBuf> {
        let mut prefix = PathBuf::new();
        for c in rel.parent()?.components() {
            prefix.push(c);
            if fs::symlink_metadata(self.root.join(&prefix)).is_ok_and(|m| m.is_symlink()) {
                return Some(prefix);
            }
        }
        None
    }

    /// Makes sure every parent directory of `rel` exists as a real directory (creating missing
    /// ones 0755 root:root, as tars often omit them) and returns the full parent path. A parent
    /// that is a symlink is refused: writing through it could land anywhere on the host.
    fn ensure_parent(&self, rel: &Path, entry: &str) -> Result<PathBuf, LayerError> {
        let mut path = self.root.to_path_buf();
        let mut prefix = PathBuf::new();
        let Some(parent) = rel.parent() else {
            return Ok(path);
        };
        for c in parent.components() {
            path.push(c);
            prefix.push(c);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_symlink() => {
                    return Err(LayerError::ThroughSymlink {
                        entry: entry.to_string(),
                        symlink: prefix.to_string_lossy().into_owned(),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(LayerError::NotADirectory {
                        entry: entry.to_string(),
                        parent: prefix.to_string_lossy().into_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path)
                        .and_then(|()| fs::set_permissions(&path, Permissions::from_mode(0o755)))
                        .map_err(|source| LayerError::Entry {
                            entry: entry.to_string(),
                            source,
                        })?;
                }
                Err(source) => {
                    return Err(LayerError::Entry {
                        entry: entry.to_string(),
                        source,
                    })
                }
            }
        }
        Ok(path)
    }

    fn apply_metadata(
        &mut self,
        path: &Path,
        header: &tar::Header,
        pax: &Pax,
        kind: Kind,
    ) -> io::Result<()> {
        let id = |v: u64| {
            u32::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uid/gid too large"))
        };
        let uid = id(pax.uid.map_or_else(|| header.uid(), Ok)?)?;
        let gid = id(pax.gid.map_or_else(|| header.gid(), Ok)?)?;
        // Ownership first: chown clears setuid/setgid bits and file capabilities, which the
        // mode and xattrs below then restore.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        if kind != Kind::Symlink {
            fs::set_permissions(path, Permissions::from_mode(header.mode()? & 0o7777))?;
        }
        for (key, value) in &pax.xattrs {
            match xattr::set(path, key, value) {
                Ok(()) => {}
                // Filesystems without xattr support (or user.* on symlinks) lose the attribute,
                // as with every other unpacker; anything else is a real failure.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => {
                    tracing::warn!("dropping xattr {key:?} on {}: {e}", path.display());
                }
                Err(e) => return Err(e),
            }
        }
        let (secs, nanos) = match pax.mtime {
            Some(t) => t,
            None => (i64::try_from(header.mtime()?).unwrap_or(i64::MAX), 0),
        };
        if kind == Kind::Dir {
            self.dir_times.push((path.to_path_buf(), secs, nanos));
            Ok(())
        } else {
            set_mtime(path, secs, nanos)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

fn read_pax<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Pax> {
    let mut pax = Pax::default();
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(pax);
    };
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        let value = ext.value().ok();
        if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
            // trusted.* is host-privileged and trusted.overlay.* steers overlayfs itself
            // (redirects, metacopy); an image must never set those.
            if !xattr.starts_with("trusted.") {
                pax.xattrs
                    .push((OsString::from(xattr), ext.value_bytes().to_vec()));
            }
            continue;
        }
        match key {
            "uid" => pax.uid = value.and_then(|v| v.parse().ok()),
            "gid" => pax.gid = value.and_then(|v| v.parse().ok()),
            "mtime" => pax.mtime = value.and_then(parse_pax_time),
            _ => {}
        }
    }
    Ok(pax)
}

/// Copies an entry's data; read failures are the archive's fault (truncated or corrupt
/// stream), write failures the destination's.
fn copy_data(src: &mut impl Read, dst: &mut File, entry: &str) -> Result<(), LayerError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LayerError::Archive(e)),
        };
        dst.write_all(&buf[..n])
            .map_err(|source| LayerError::Entry {
                entry: entry.to_string(),
                source,
            })?;
    }
}

/// Removes whatever is at `path` (never following a symlink there) so a new entry can take its
/// place. With `keep_dir`, an existing directory is kept (a later tar entry for the same
/// directory only updates its metadata) and `true` is returned.
fn clear(path: &Path, keep_dir: bool) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() && keep_dir => Ok(true),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map(|()| false),
        Ok(_) => fs::remove_file(path).map(|()| false),
    }
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) -> io::Result<()> {
    let t = TimeSpec::new(secs, nanos);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_refuses_escapes() {
        assert_eq!(
            clean_path(b"./etc/passwd").unwrap(),
            Path::new("etc/passwd")
        );
        assert_eq!(clean_path(b"a//b/").unwrap(), Path::new("a/b"));
        assert_eq!(clean_path(b"./").unwrap(), Path::new(""));
        assert!(clean_path(b"../x").is_none());
        assert!(clean_path(b"a/../../x").is_none());
        assert!(clean_path(b"/etc/passwd").is_none());
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
