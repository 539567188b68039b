//! The content-addressed store: blobs, unpacked layers, image records and the reference index.
//!
//! Crash and concurrency safety rests on two rules:
//! * content (blobs, layer dirs, records, the index) only appears under its final name through
//!   `rename(2)` of a fully written and verified temporary, so anything found under a final name
//!   is complete and trusted;
//! * writers of content (pulls, imports) hold a shared `flock` on `<root>/lock` for their whole
//!   run, and garbage collection takes it exclusively (non-blocking), so GC never deletes a blob
//!   or layer that an in-flight pull has fetched but not yet recorded in an image record.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{BlobError, LayerError, StoreError};
use crate::reference::parse_reference;
use crate::{Image, ImageConfig, OpenError, RegistryConfig};

/// The image store. Cheap to clone; all state lives on disk.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    pub(crate) registries: RegistryConfig,
}

/// What is persisted per image, keyed by image id. References live in the index only, so that
/// there is a single source of truth for which reference points where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub id: String,
    pub manifest_digest: String,
    pub config: ImageConfig,
    pub layers: Vec<LayerRecord>,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// Digest of the (possibly compressed) layer blob.
    pub digest: String,
    /// Digest of the uncompressed tar: names the unpacked directory.
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// normalized reference -> image id
    refs: BTreeMap<String, String>,
}

/// Returns the hex part of a well-formed `sha256:<64 lowercase hex>` digest. Digests come from
/// untrusted manifests and become path components, so nothing else may pass.
pub(crate) fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A unique name for a temporary file or directory (unique across processes and threads).
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to `dest` atomically: a temporary next to it, fsync, rename.
pub(crate) fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}", unique_name("tmp")));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Streams a blob into `tmp/`, hashing as it goes; `commit` renames it into `blobs/` only if the
/// digest matches. Dropping an uncommitted writer deletes the temporary.
pub(crate) struct BlobWriter {
    file: File,
    tmp: PathBuf,
    hasher: Sha256,
    written: u64,
    committed: bool,
}

impl BlobWriter {
    pub fn write(&mut self, buf: &[u8]) -> Result<(), BlobError> {
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        self.file
            .write_all(buf)
            .map_err(|e| BlobError::Store(StoreError::io(&self.tmp)(e)))
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Digest of everything written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    pub fn commit(mut self, store: &ImageStore, expected: &str) -> Result<PathBuf, BlobError> {
        let dest = store.blob_path(expected)?;
        let actual = self.digest();
        if actual != expected {
            return Err(BlobError::Mismatch {
                expected: expected.to_string(),
                actual,
            });
        }
        self.file
            .sync_all()
            .map_err(|e| BlobError::Store(StoreError::io(&self.tmp)(e)))?;
        // Replacing an existing blob (a concurrent pull of the same content) is harmless: same
        // bytes, and rename is atomic for readers.
        fs::rename(&self.tmp, &dest).map_err(|e| BlobError::Store(StoreError::io(&dest)(e)))?;
        self.committed = true;
        Ok(dest)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Holds the shared store lock (see the module docs); released on drop.
pub(crate) struct ContentLock {
    _lock: Flock<File>,
}

impl ImageStore {
    /// Opens the store at `root`, creating its directories if needed. Leftovers of interrupted
    /// pulls in `tmp/` are removed when no other process is using the store.
    pub fn open(root: impl Into<PathBuf>, registries: RegistryConfig) -> Result<Self, OpenError> {
        let root = root.into();
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        // The root is traversable but not listable; blobs, metadata and the unpacked layers
        // are private. Layers hold whatever images ship, setuid-root programs included
        // (legitimate in a container, whose no_new_privs and user decide what they may do),
        // so no host user but root may reach them: `layers` is 0700 (also on a store made
        // when it was 0711), as containerd keeps its snapshots since CVE-2021-41103. Root
        // (the runtimes, the overlay mounts) is not bound by the mode.
        let dirs: [(&str, u32); 6] = [
            ("", 0o711),
            ("blobs/sha256", 0o700),
            ("layers", 0o700),
            ("layers/sha256", 0o711),
            ("images/sha256", 0o700),
            ("tmp", 0o700),
        ];
        for (dir, mode) in dirs {
            let path = root.join(dir);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&path)
                .map_err(io_err(&path))?;
        }
        let layers = root.join("layers");
        fs::set_permissions(&layers, fs::Permissions::from_mode(0o700)).map_err(io_err(&layers))?;
        for lock in ["lock", "images/index.lock"] {
            let path = root.join(lock);
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
        }
        let store = ImageStore { root, registries };
        if let Err(e) = store.try_gc() {
            tracing::warn!("image store garbage collection at open failed: {e}");
        }
        Ok(store)
    }

    /// The store root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The registry settings this store pulls with.
    pub fn registries(&self) -> &RegistryConfig {
        &self.registries
    }

    /// The same store, pulling from `reference`'s registry with `credentials`
    /// (CRI PullImage carries them per request), whatever the configuration says.
    pub fn with_credentials(
        &self,
        reference: &str,
        credentials: crate::Credentials,
    ) -> Result<ImageStore, crate::ReferenceError> {
        let registry = crate::reference::parse_reference(reference)?
            .registry()
            .to_string();
        let mut store = self.clone();
        store.registries.auth.insert(registry, credentials);
        Ok(store)
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        let hex = sha256_hex(digest).ok_or_else(|| BlobError::BadDigest(digest.to_string()))?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    pub(crate) fn layer_path(&self, diff_id: &str) -> Option<PathBuf> {
        sha256_hex(diff_id).map(|hex| self.root.join("layers/sha256").join(hex))
    }

    fn record_path(&self, id: &str) -> Option<PathBuf> {
        sha256_hex(id).map(|hex| self.root.join("images/sha256").join(format!("{hex}.json")))
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("images/index.json")
    }

    pub(crate) fn tmp_path(&self, prefix: &str) -> PathBuf {
        self.root.join("tmp").join(unique_name(prefix))
    }

    pub(crate) fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    pub(crate) fn blob_writer(&self) -> Result<BlobWriter, BlobError> {
        let tmp = self.tmp_path("blob");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| BlobError::Store(StoreError::io(&tmp)(e)))?;
        Ok(BlobWriter {
            file,
            tmp,
            hasher: Sha256::new(),
            written: 0,
            committed: false,
        })
    }

    /// Stores an in-memory blob (manifests, configs) after checking its digest.
    pub(crate) fn write_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<(), BlobError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        let mut w = self.blob_writer()?;
        w.write(bytes)?;
        w.commit(self, digest).map(drop)
    }

    /// Reads a small stored blob (manifest, config), refusing anything over `max` bytes.
    pub(crate) fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, BlobError> {
        let path = self.blob_path(digest)?;
        let file = File::open(&path).map_err(|e| BlobError::Store(StoreError::io(&path)(e)))?;
        let mut buf = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| BlobError::Store(StoreError::io(&path)(e)))?;
        if buf.len() as u64 > max {
            return Err(BlobError::TooLarge { expected: max });
        }
        Ok(buf)
    }

    /// Unpacks the stored layer blob `digest` into `layers/sha256/<diff_id>` unless that layer
    /// is already there: a tar is extracted, a raw wasm blob (`wasm_file` given) becomes that
    /// one file. Blocking; callers in async code run it on the blocking pool.
    pub(crate) fn ensure_layer(
        &self,
        digest: &str,
        diff_id: &str,
        wasm_file: Option<&str>,
    ) -> Result<PathBuf, LayerError> {
        let bad = |what: &str, d: &str| LayerError::Io {
            path: PathBuf::from(d),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("invalid {what} digest")),
        };
        let dest = self
            .layer_path(diff_id)
            .ok_or_else(|| bad("diff_id", diff_id))?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let blob = self.blob_path(digest).map_err(|_| bad("layer", digest))?;
        match wasm_file {
            Some(name) => {
                crate::unpack::place_wasm(&blob, digest, name, &self.tmp_path("layer"), &dest)?
            }
            None => crate::unpack::unpack_layer(&blob, diff_id, &self.tmp_path("layer"), &dest)?,
        }
        Ok(dest)
    }

    pub(crate) fn lock_file(
        &self,
        name: &str,
        arg: FlockArg,
    ) -> Result<Option<Flock<File>>, StoreError> {
        let path = self.root.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(StoreError::Io {
                path,
                source: errno.into(),
            }),
        }
    }

    /// Takes the shared content lock (blocking only while a GC runs, which is short).
    pub(crate) fn lock_content(&self) -> Result<ContentLock, StoreError> {
        let lock = self
            .lock_file("lock", FlockArg::LockShared)?
            .ok_or_else(|| would_block(&self.root.join("lock")))?;
        Ok(ContentLock { _lock: lock })
    }

    pub(crate) async fn lock_content_async(&self) -> Result<ContentLock, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.lock_content())
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    path: PathBuf::from("lock"),
                    source: io::Error::other(e),
                })
            })
    }

    fn lock_index(&self) -> Result<Flock<File>, StoreError> {
        self.lock_file("images/index.lock", FlockArg::LockExclusive)?
            .ok_or_else(|| would_block(&self.root.join("images/index.lock")))
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let path = self.index_path();
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(StoreError::io(path))
    }

    pub(crate) fn read_record(&self, id: &str) -> Result<Option<ImageRecord>, StoreError> {
        let Some(path) = self.record_path(id) else {
            return Ok(None);
        };
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            // A record can vanish between reading the index and reading it (concurrent rm).
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn record_ids(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("images/sha256");
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let entry = entry.map_err(StoreError::io(&dir))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let id = format!("sha256:{hex}");
            if sha256_hex(&id).is_some() {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn to_image(&self, record: ImageRecord, index: &Index) -> Image {
        let references = index
            .refs
            .iter()
            .filter(|(_, id)| **id == record.id)
            .map(|(r, _)| r.clone())
            .collect();
        let layers = record
            .layers
            .iter()
            .filter_map(|l| self.layer_path(&l.diff_id))
            .collect();
        Image {
            id: record.id,
            references,
            manifest_digest: record.manifest_digest,
            config: record.config,
            layers,
            size: record.size,
        }
    }

    /// Records a fully stored image and points `references` at it.
    pub(crate) fn commit_image(
        &self,
        record: ImageRecord,
        references: &[String],
    ) -> Result<Image, StoreError> {
        let path = self
            .record_path(&record.id)
            .ok_or_else(|| StoreError::Corrupt {
                path: PathBuf::from(&record.id),
                reason: "invalid image id".to_string(),
            })?;
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let _guard = self.lock_index()?;
        write_atomic(&path, &bytes).map_err(StoreError::io(&path))?;
        let mut index = self.read_index()?;
        for r in references {
            // A tag that moves leaves the previous image untagged but present (pods may still
            // run from it); removing it is the kubelet's image GC's business.
            index.refs.insert(r.clone(), record.id.clone());
        }
        self.write_index(&index)?;
        Ok(self.to_image(record, &index))
    }

    /// Resolves a reference or image id to an id, without reading the record.
    fn resolve(&self, reference: &str, index: &Index) -> Result<Option<String>, StoreError> {
        if let Ok(r) = parse_reference(reference) {
            let name = r.whole();
            if let Some(id) = index.refs.get(&name) {
                return Ok(Some(id.clone()));
            }
            // `repo@sha256:…` of an image pulled by tag: match on repository + manifest digest.
            if let Some(digest) = r.digest() {
                let repo = format!("{}/{}", r.registry(), r.repository());
                for (other, id) in &index.refs {
                    let same_repo = other
                        .strip_prefix(&repo)
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'));
                    if same_repo
                        && self
                            .read_record(id)?
                            .is_some_and(|rec| rec.manifest_digest == digest)
                    {
                        return Ok(Some(id.clone()));
                    }
                }
            }
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let prefix = prefix.to_ascii_lowercase();
        let matches: Vec<String> = self
            .record_ids()?
            .into_iter()
            .filter(|id| id["sha256:".len()..].starts_with(&prefix))
            .collect();
        match matches.len() {
            0 => Ok(None),
            1 => Ok(matches.into_iter().next()),
            count => Err(StoreError::Ambiguous {
                reference: reference.to_string(),
                count,
            }),
        }
    }

    /// Looks an image up by reference (normalized like `pull` does) or by image id / id prefix
    /// (with or without `sha256:`).
    pub fn get(&self, reference: &str) -> Result<Option<Image>, StoreError> {
        let index = self.read_index()?;
        let Some(id) = self.resolve(reference, &index)? else {
            return Ok(None);
        };
        Ok(self.read_record(&id)?.map(|rec| self.to_image(rec, &index)))
    }

    /// All images, untagged ones included, sorted by first reference then id.
    pub fn list(&self) -> Result<Vec<Image>, StoreError> {
        let index = self.read_index()?;
        let mut images = Vec::new();
        for id in self.record_ids()? {
            if let Some(rec) = self.read_record(&id)? {
                images.push(self.to_image(rec, &index));
            }
        }
        images.sort_by(|a, b| (a.references.first(), &a.id).cmp(&(b.references.first(), &b.id)));
        Ok(images)
    }

    /// Removes a reference; an image left without references is deleted. Given an image id,
    /// removes the image and all its references. Blobs and layers no longer used by any image
    /// are then deleted — unless a pull or import is running, in which case that cleanup is
    /// left to the next `remove` or `open` (GC never waits for pulls).
    ///
    /// Layers still mounted by running pods are the caller's concern (the kubelet only removes
    /// images no container uses).
    pub fn remove(&self, reference: &str) -> Result<(), StoreError> {
        {
            let _guard = self.lock_index()?;
            let mut index = self.read_index()?;
            let by_ref = parse_reference(reference)
                .ok()
                .map(|r| r.whole())
                .filter(|name| index.refs.contains_key(name));
            let id = match by_ref {
                Some(name) => index.refs.remove(&name).unwrap_or_default(),
                None => {
                    let id =
                        self.resolve(reference, &index)?
                            .ok_or_else(|| StoreError::NotFound {
                                reference: reference.to_string(),
                            })?;
                    index.refs.retain(|_, v| *v != id);
                    id
                }
            };
            if !index.refs.values().any(|v| *v == id) {
                if let Some(path) = self.record_path(&id) {
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(StoreError::Io { path, source: e }),
                    }
                }
            }
            self.write_index(&index)?;
        }
        if !self.try_gc()? {
            tracing::info!("image store busy (pull in progress): unused blobs are left for later");
        }
        Ok(())
    }

    /// Deletes blobs and layers that no image record uses, and leftovers in `tmp/`. Returns
    /// false without doing anything if a pull or import holds the store.
    pub fn try_gc(&self) -> Result<bool, StoreError> {
        let Some(_exclusive) = self.lock_file("lock", FlockArg::LockExclusiveNonblock)? else {
            return Ok(false);
        };
        let mut live_blobs = BTreeSet::new();
        let mut live_layers = BTreeSet::new();
        for id in self.record_ids()? {
            // An unreadable record must keep its content alive rather than lose it.
            let Some(rec) = self.read_record(&id)? else {
                continue;
            };
            live_blobs.insert(rec.id.clone());
            live_blobs.insert(rec.manifest_digest.clone());
            for l in &rec.layers {
                live_blobs.insert(l.digest.clone());
                live_layers.insert(l.diff_id.clone());
            }
        }
        sweep(&self.root.join("blobs/sha256"), |name| {
            live_blobs.contains(&format!("sha256:{name}"))
        })?;
        sweep(&self.root.join("layers/sha256"), |name| {
            live_layers.contains(&format!("sha256:{name}"))
        })?;
        let block_dir = self.root.join(crate::block::BLOCK_DIR);
        if block_dir.is_dir() {
            sweep(&block_dir, |name| {
                name.strip_suffix(crate::block::BLOCK_SUFFIX)
                    .is_some_and(|hex| live_blobs.contains(&format!("sha256:{hex}")))
            })?;
        }
        sweep(&self.root.join("tmp"), |_| false)?;
        Ok(true)
    }
}

/// A blocking flock never reports EWOULDBLOCK; mapped to an error rather than assumed.
fn would_block(path: &Path) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::WouldBlock),
    }
}

/// Removes every entry of `dir` whose name `keep` rejects.
fn sweep(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let entry = entry.map_err(StoreError::io(dir))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(&keep) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map_err(StoreError::io(&path))?.is_dir();
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io { path, source: e }),
        }
    }
    Ok(())
}
