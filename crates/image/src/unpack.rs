//! Unpacking a layer tar into an overlayfs lowerdir.
//!
//! The extractor is our own rather than `tar::Archive::unpack` because overlayfs needs whiteouts
//! converted (`.wh.NAME` → 0:0 char device, `.wh..wh..opq` → `trusted.overlay.opaque=y`) and
//! because layers are untrusted: every entry is checked so nothing is ever created outside the
//! layer directory, neither by `..`/absolute names, nor through a symlink planted by an earlier
//! entry (`evil -> /etc`, then `evil/passwd`), nor by a hardlink to a file outside the layer.
//!
//! Headers are bounded as Go's archive/tar (so containerd and podman) bounds them: the PAX
//! records and GNU long names/links of one entry may take at most [`MAX_HEADER_BYTES`], read
//! through a budget so a gzip bomb of a header is refused before it is in memory. Entries that
//! carry no data (directories, links, devices, FIFOs) must say so (size 0): Go skips no data for
//! them and tar-rs skips their size, so such an archive would list different files to a scanner
//! than to us. Device nodes other than overlay whiteouts (char 0:0) are skipped, as rootless
//! containerd does: a container gets its own `/dev`, and a node in the store would give whoever
//! reaches the store a host device.
//!
//! The uncompressed stream is hashed while it is read and must match the config's diff_id; the
//! layer is extracted into a temporary directory and renamed into place only if everything
//! checked out, so a half-written or unverified layer is never found under its final name.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};

use crate::error::LayerError;

const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// What the tar reader may read between two entries: the next entry's header blocks and its
/// extension records (PAX `x`, GNU `L`/`K`) together. Go's archive/tar allows 1 MiB per record.
pub(crate) const MAX_HEADER_BYTES: u64 = 1 << 20;

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
        let budget = Rc::new(HeaderBudget::default());
        let mut archive = tar::Archive::new(Budgeted {
            inner: reader,
            budget: budget.clone(),
        });
        let mut previous: Option<String> = None;
        {
            let mut entries = archive.entries().map_err(LayerError::Archive)?;
            loop {
                budget.limit(MAX_HEADER_BYTES);
                let next = entries.next();
                budget.unlimit();
                let Some(entry) = next else { break };
                let mut entry = entry.map_err(|e| {
                    if budget.exceeded.get() {
                        LayerError::HeadersTooLarge {
                            entry: match &previous {
                                Some(p) => format!("the entry after {p:?}"),
                                None => "the first entry".to_string(),
                            },
                            limit: MAX_HEADER_BYTES,
                        }
                    } else {
                        LayerError::Archive(e)
                    }
                })?;
                self.entry(&mut entry)?;
                previous = Some(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
            }
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

        use tar::EntryType as T;
        let header_only = matches!(
            kind,
            T::Directory | T::Symlink | T::Link | T::Char | T::Block | T::Fifo
        );
        if header_only && entry.size() > 0 {
            return Err(LayerError::DataOnHeaderOnly {
                entry: name,
                kind: format!("{kind:?}"),
                size: entry.size(),
            });
        }
        if matches!(kind, T::Char | T::Block) {
            let major = entry.header().device_major().ok().flatten().unwrap_or(0);
            let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
            if kind == T::Block || (major, minor) != (0, 0) {
                tracing::warn!(
                    "layer entry {name:?}: skipping {kind:?} device {major}:{minor} (device nodes are not unpacked)"
                );
                return Ok(());
            }
        }

        self.ensure_parent(&rel, &name)?;
        let target = self.root.join(&rel);
        let header = entry.header().clone();
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
                // A sparse entry's size is that of its stored chunks, not of the file.
                let size = (kind != T::GNUSparse).then(|| entry.size());
                copy_data(entry, &mut file, &target, &name, size)?;
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
/// stream), write failures the destination's. With `size`, a stream that ends before the
/// entry's size (which tar-rs reads as a short file) is an error.
fn copy_data(
    src: &mut impl Read,
    dst: &mut File,
    dst_path: &Path,
    entry: &str,
    size: Option<u64>,
) -> Result<(), LayerError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => {
                return match size {
                    Some(size) if copied < size => Err(LayerError::Truncated {
                        entry: entry.to_string(),
                        got: copied,
                        size,
                    }),
                    _ => Ok(()),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LayerError::Archive(e)),
        };
        dst.write_all(&buf[..n])
            .map_err(|source| LayerError::Write {
                entry: entry.to_string(),
                path: dst_path.to_path_buf(),
                source,
            })?;
        copied += n as u64;
    }
}

/// How much the tar reader may still read (None: no limit), shared with [`Budgeted`].
#[derive(Default)]
struct HeaderBudget {
    remaining: Cell<Option<u64>>,
    exceeded: Cell<bool>,
}

impl HeaderBudget {
    fn limit(&self, bytes: u64) {
        self.remaining.set(Some(bytes));
    }

    fn unlimit(&self) {
        self.remaining.set(None);
    }
}

/// The layer stream as the tar reader sees it: reads fail once the budget is spent.
struct Budgeted<R> {
    inner: R,
    budget: Rc<HeaderBudget>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(remaining) = self.budget.remaining.get() else {
            return self.inner.read(buf);
        };
        if remaining == 0 && !buf.is_empty() {
            self.budget.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tar headers too large",
            ));
        }
        let max = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.budget.remaining.set(Some(remaining - n as u64));
        Ok(n)
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

    /// A GNU header block for `path` of type `kind` claiming `size` bytes.
    fn header(kind: tar::EntryType, path: &str, size: u64, mode: u32) -> Vec<u8> {
        header_with(kind, path, size, mode, |_| {})
    }

    fn header_with(
        kind: tar::EntryType,
        path: &str,
        size: u64,
        mode: u32,
        more: impl FnOnce(&mut tar::Header),
    ) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        more(&mut h);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(mut data: Vec<u8>) -> Vec<u8> {
        data.resize(data.len().div_ceil(512) * 512, 0);
        data
    }

    /// A reader that counts what was taken from it.
    struct Counting<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    /// Extracts `stream` into a fresh directory; the result and how many bytes were read.
    fn extract(stream: impl Read) -> (tempfile::TempDir, Result<(), LayerError>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let read = Rc::new(Cell::new(0));
        let result = Extractor::new(dir.path()).extract(Counting {
            inner: stream,
            read: read.clone(),
        });
        (dir, result, read.get())
    }

    #[test]
    fn huge_extension_headers_are_refused_before_they_are_read() {
        use tar::EntryType as T;
        const GIB: u64 = 1 << 30;
        let first = [header(T::Regular, "a", 1, 0o644), padded(b"x".to_vec())].concat();
        for (kind, what) in [
            (T::GNULongName, "GNU long name"),
            (T::GNULongLink, "GNU long link"),
            (T::XHeader, "PAX header"),
        ] {
            // A 4 GiB record of zeros (what a few MiB of gzip expand to), after one entry.
            let stream = io::Cursor::new(first.clone())
                .chain(io::Cursor::new(header(
                    kind,
                    "././@LongLink",
                    4 * GIB,
                    0o644,
                )))
                .chain(io::repeat(0).take(4 * GIB));
            let (_dir, result, read) = extract(stream);
            let err = result.unwrap_err();
            assert!(
                matches!(err, LayerError::HeadersTooLarge { .. }),
                "{what}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                "the entry after \"a\": tar headers (PAX records, GNU long name or link) take more than 1024 KiB",
                "{what}"
            );
            assert!(
                read < 2 * MAX_HEADER_BYTES,
                "{what}: read {read} bytes before refusing"
            );
        }
        // The same as the first entry; a PAX header of a plausible size still works.
        let stream = io::Cursor::new(header(T::XHeader, "pax", 100 * GIB, 0o644))
            .chain(io::repeat(b'1').take(100 * GIB));
        let (_dir, result, read) = extract(stream);
        let err = result.unwrap_err().to_string();
        assert!(err.starts_with("the first entry: tar headers"), "{err}");
        assert!(read < 2 * MAX_HEADER_BYTES);
        // A 2,000-byte path (deep directories) in a PAX record.
        let long = format!("{}leaf", "dir/".repeat(499));
        let record = format!("{} path={long}\n", 4 + 6 + long.len() + 1);
        let stream = [
            header(T::XHeader, "pax", record.len() as u64, 0o644),
            padded(record.into_bytes()),
            header(T::Regular, "short-name", 2, 0o644),
            padded(b"ok".to_vec()),
            vec![0; 1024],
        ]
        .concat();
        let (dir, result, _) = extract(stream.as_slice());
        result.unwrap();
        assert_eq!(fs::read(dir.path().join(long)).unwrap(), b"ok");
    }

    #[test]
    fn a_size_claiming_terabytes_is_a_truncated_entry() {
        use tar::EntryType as T;
        // The header says 1 TiB, the stream holds 3 bytes and ends.
        let stream = [header(T::Regular, "big", 1 << 40, 0o644), b"abc".to_vec()].concat();
        let (_dir, result, _) = extract(stream.as_slice());
        let err = result.unwrap_err();
        assert!(matches!(err, LayerError::Truncated { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "entry \"big\": the archive ends after 3 of its 1099511627776 bytes"
        );
        // Through unpack_layer, nothing is left: neither the temporary nor the layer.
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        fs::write(&blob, &stream).unwrap();
        let (tmp, dest) = (dir.path().join("tmp"), dir.path().join("layer"));
        let err = unpack_layer(&blob, "sha256:00", &tmp, &dest).unwrap_err();
        assert!(matches!(err, LayerError::Truncated { .. }), "{err:?}");
        assert!(!tmp.exists() && !dest.exists());
    }

    #[test]
    fn entries_without_data_must_claim_none() {
        use tar::EntryType as T;
        for kind in [
            T::Directory,
            T::Symlink,
            T::Link,
            T::Char,
            T::Block,
            T::Fifo,
        ] {
            // Go's archive/tar reads the next header right after this one; tar-rs would skip
            // 512 bytes: two readers, two file lists. Refused.
            let stream = [
                header(kind, "d", 512, 0o755),
                header(T::Regular, "hidden", 0, 0o644),
                vec![0; 1024],
            ]
            .concat();
            let (dir, result, _) = extract(stream.as_slice());
            let err = result.unwrap_err();
            assert!(
                matches!(err, LayerError::DataOnHeaderOnly { .. }),
                "{kind:?}: {err:?}"
            );
            assert!(
                err.to_string()
                    .ends_with("entry carries no data, but its header says 512 bytes"),
                "{err}"
            );
            assert!(!dir.path().join("d").exists() && !dir.path().join("hidden").exists());
        }
    }

    #[test]
    fn device_nodes_are_skipped_setuid_bits_fifos_and_whiteouts_kept() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        use tar::EntryType as T;
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: device_nodes_are_skipped_setuid_bits_fifos_and_whiteouts_kept needs root (chown, mknod)");
            return;
        }
        let device = |kind, path: &str, major, minor| {
            header_with(kind, path, 0, 0o666, |h| {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
            })
        };
        let stream = [
            header(T::Directory, "dev", 0, 0o755),
            device(T::Block, "dev/sda", 8, 0),
            device(T::Char, "dev/mem", 1, 1),
            device(T::Char, "dev/null", 1, 3),
            device(T::Char, "gone", 0, 0),
            header(T::Fifo, "fifo", 0, 0o600),
            header(T::Regular, "suid", 1, 0o4755),
            padded(b"x".to_vec()),
            header(T::Regular, "sgid", 1, 0o2711),
            padded(b"y".to_vec()),
            vec![0; 1024],
        ]
        .concat();
        let (dir, result, _) = extract(stream.as_slice());
        result.unwrap();
        let root = dir.path();
        for skipped in ["dev/sda", "dev/mem", "dev/null"] {
            assert!(
                fs::symlink_metadata(root.join(skipped)).is_err(),
                "{skipped} was made"
            );
        }
        let wh = fs::symlink_metadata(root.join("gone")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        assert!(fs::symlink_metadata(root.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        let mode = |p: &str| fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o4755);
        assert_eq!(mode("sgid"), 0o2711);
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
