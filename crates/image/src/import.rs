//! Importing images from local files: an OCI image-layout directory, an `oci-archive` (a tarred
//! layout) or a `docker save` tar (`manifest.json` + layer tars; newer Docker writes both).
//!
//! Archives are first extracted into the store's `tmp/` (regular files and directories only —
//! symlinks, which `docker save` uses to share identical layers, are resolved by name inside the
//! archive instead of being created), then imported like a directory.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::error::{BlobError, ImportError};
use crate::manifest::{
    parse_config, parse_image_config, parse_manifest, select_platform, Descriptor, Manifest,
    Parsed, ParsedConfig, MAX_JSON_SIZE, OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD,
    OCI_MANIFEST,
};
use crate::reference::normalize_reference;
use crate::store::{sha256_digest, sha256_hex, ImageRecord, LayerRecord};
use crate::{Image, ImageStore, PullProgress};

/// Annotation Docker and containerd put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

impl ImageStore {
    /// Imports every image of an OCI layout directory, oci-archive or docker-save tar (plain or
    /// gzip/zstd-compressed). Returns the imported images; references come from `RepoTags`
    /// (docker-save) or the `io.containerd.image.name` / `org.opencontainers.image.ref.name`
    /// annotations (OCI), and images without one are imported untagged (addressable by id).
    pub fn import(
        &self,
        path: &Path,
        progress: &dyn PullProgress,
    ) -> Result<Vec<Image>, ImportError> {
        let ctx = Import {
            store: self,
            path: path.to_path_buf(),
            progress,
        };
        let lock = self
            .lock_content()
            .map_err(|source| ctx.store_err(source))?;
        let result = ctx.run();
        drop(lock);
        if result.is_err() {
            if let Err(e) = self.try_gc() {
                tracing::warn!("cleanup after failed import: {e}");
            }
        }
        result
    }
}

struct Import<'a> {
    store: &'a ImageStore,
    path: PathBuf,
    progress: &'a dyn PullProgress,
}

/// A directory holding the import source, plus the symlinks/hardlinks of the archive it came
/// from (archive-relative name → archive-relative target).
struct Source {
    dir: PathBuf,
    links: HashMap<PathBuf, PathBuf>,
    /// The extraction directory, removed when the import ends.
    cleanup: Option<PathBuf>,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(dir) = &self.cleanup {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A `..`-free relative path, resolving `..` lexically; `None` if it leaves the root or is
/// absolute.
fn normalize_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

impl Import<'_> {
    fn io_err(&self, path: &Path) -> impl FnOnce(io::Error) -> ImportError {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    }

    fn malformed(&self, reason: impl Into<String>) -> ImportError {
        ImportError::Malformed {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn store_err(&self, source: crate::StoreError) -> ImportError {
        ImportError::Store {
            path: self.path.clone(),
            source,
        }
    }

    fn blob_err(&self, err: BlobError) -> ImportError {
        match err {
            BlobError::Mismatch { expected, actual } => ImportError::DigestMismatch {
                path: self.path.clone(),
                digest: expected,
                actual,
            },
            BlobError::BadDigest(d) => {
                self.malformed(format!("invalid digest {d:?} (only sha256 is supported)"))
            }
            BlobError::TooLarge { expected } => {
                self.malformed(format!("blob larger than expected ({expected} bytes)"))
            }
            BlobError::Store(source) => self.store_err(source),
        }
    }

    fn run(&self) -> Result<Vec<Image>, ImportError> {
        let meta = fs::metadata(&self.path).map_err(self.io_err(&self.path))?;
        let source = if meta.is_dir() {
            Source {
                dir: self.path.clone(),
                links: HashMap::new(),
                cleanup: None,
            }
        } else {
            self.extract_archive()?
        };
        if source.exists(Path::new("manifest.json")) {
            self.import_docker(&source)
        } else if source.exists(Path::new("index.json")) {
            self.import_layout(&source)
        } else {
            Err(ImportError::UnknownFormat {
                path: self.path.clone(),
            })
        }
    }

    fn extract_archive(&self) -> Result<Source, ImportError> {
        let file = File::open(&self.path).map_err(self.io_err(&self.path))?;
        let dir = self.store.tmp_path("import");
        fs::create_dir(&dir).map_err(self.io_err(&dir))?;
        let mut source = Source {
            dir,
            links: HashMap::new(),
            cleanup: None,
        };
        source.cleanup = Some(source.dir.clone());
        let reader = crate::unpack::decompressor(file).map_err(self.io_err(&self.path))?;
        let mut archive = tar::Archive::new(reader);
        let bad = |e: io::Error| self.malformed(format!("not a readable tar archive: {e}"));
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let rel = crate::unpack::clean_path(&raw).ok_or_else(|| {
                self.malformed(format!("archive entry {name:?} escapes the archive"))
            })?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            let dest = source.dir.join(&rel);
            use tar::EntryType as T;
            match entry.header().entry_type() {
                T::Directory => fs::create_dir_all(&dest).map_err(self.io_err(&dest))?,
                T::Regular | T::Continuous => {
                    // Only regular files and directories are created, so no path below
                    // `source.dir` can lead elsewhere.
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent).map_err(self.io_err(parent))?;
                    }
                    let mut out = File::create(&dest).map_err(self.io_err(&dest))?;
                    io::copy(&mut entry, &mut out).map_err(bad)?;
                }
                T::Symlink => {
                    let target = entry.link_name().map_err(bad)?.unwrap_or_default();
                    let joined = rel.parent().unwrap_or(Path::new("")).join(target);
                    let target = normalize_rel(&joined).ok_or_else(|| {
                        self.malformed(format!("archive symlink {name:?} points outside"))
                    })?;
                    source.links.insert(rel, target);
                }
                T::Link => {
                    let target = entry.link_name().map_err(bad)?.unwrap_or_default();
                    let target = normalize_rel(&target).ok_or_else(|| {
                        self.malformed(format!("archive hardlink {name:?} points outside"))
                    })?;
                    source.links.insert(rel, target);
                }
                _ => {}
            }
        }
        Ok(source)
    }

    fn import_docker(&self, source: &Source) -> Result<Vec<Image>, ImportError> {
        let bytes = source.read_small(self, "manifest.json")?;
        let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| self.malformed(format!("manifest.json: {e}")))?;
        let mut images = Vec::new();
        for entry in entries {
            let config_bytes = source.read_small(self, &entry.config)?;
            let config_digest = sha256_digest(&config_bytes);
            let parsed = self.check_config(
                &config_digest,
                parse_config(&config_bytes),
                entry.layers.len(),
            )?;
            self.store
                .write_blob_bytes(&config_digest, &config_bytes)
                .map_err(|e| self.blob_err(e))?;
            let mut layers = Vec::new();
            for name in &entry.layers {
                let mut file = source.open(self, name)?;
                let (digest, size, media_type) = self.copy_layer(&mut file, name)?;
                layers.push(Descriptor {
                    media_type: media_type.to_string(),
                    digest,
                    size: i64::try_from(size).unwrap_or(i64::MAX),
                    ..Descriptor::default()
                });
            }
            // docker-save has no registry manifest; synthesize the OCI manifest a registry
            // would serve so every image in the store has one.
            let manifest = Manifest {
                schema_version: 2,
                media_type: OCI_MANIFEST.to_string(),
                config: Descriptor {
                    media_type: OCI_CONFIG.to_string(),
                    digest: config_digest,
                    size: config_bytes.len() as i64,
                    ..Descriptor::default()
                },
                layers,
            };
            let manifest_bytes = serde_json::to_vec(&manifest)
                .map_err(|e| self.malformed(format!("manifest: {e}")))?;
            let manifest_digest = sha256_digest(&manifest_bytes);
            self.store
                .write_blob_bytes(&manifest_digest, &manifest_bytes)
                .map_err(|e| self.blob_err(e))?;
            let refs = self.normalize_refs(entry.repo_tags.unwrap_or_default());
            images.push(self.finish(
                manifest_digest,
                &manifest,
                parsed,
                config_bytes.len(),
                refs,
            )?);
        }
        Ok(images)
    }

    fn import_layout(&self, source: &Source) -> Result<Vec<Image>, ImportError> {
        let bytes = source.read_small(self, "index.json")?;
        let Parsed::Index(entries) =
            parse_manifest(&bytes).map_err(|e| self.malformed(format!("index.json: {e}")))?
        else {
            return Err(self.malformed("index.json is not an image index"));
        };
        let mut images = Vec::new();
        for entry in &entries {
            let annotations = entry.annotations.clone().unwrap_or_default();
            let name = annotations.get(CONTAINERD_NAME).cloned().or_else(|| {
                // ref.name is often only a tag ("latest"); only a full name can be a reference.
                annotations
                    .get(OCI_REF_NAME)
                    .filter(|n| n.contains([':', '/', '@']))
                    .cloned()
            });
            if name.is_none() {
                if let Some(tag) = annotations.get(OCI_REF_NAME) {
                    self.progress.message(&format!(
                        "{}: ref.name {tag:?} is not a full image name; importing untagged",
                        entry.digest
                    ));
                }
            }
            let (manifest_digest, manifest_bytes, manifest) =
                self.layout_manifest(source, entry)?;
            let config_bytes = self.layout_blob(source, &manifest.config, Some(MAX_JSON_SIZE))?;
            let parsed = self.check_config(
                &manifest.config.digest,
                parse_image_config(&manifest.config, &manifest.layers, &config_bytes),
                manifest.layers.len(),
            )?;
            for layer in &manifest.layers {
                if !crate::manifest::is_layer_media_type(&layer.media_type) {
                    return Err(self.malformed(format!(
                        "layer {} has unsupported media type {:?}",
                        layer.digest, layer.media_type
                    )));
                }
                self.layout_blob(source, layer, None)?;
            }
            self.store
                .write_blob_bytes(&manifest_digest, &manifest_bytes)
                .map_err(|e| self.blob_err(e))?;
            let refs = self.normalize_refs(name);
            images.push(self.finish(
                manifest_digest,
                &manifest,
                parsed,
                config_bytes.len(),
                refs,
            )?);
        }
        Ok(images)
    }

    /// Follows an index entry down to a linux/amd64 image manifest.
    fn layout_manifest(
        &self,
        source: &Source,
        entry: &Descriptor,
    ) -> Result<(String, Vec<u8>, Manifest), ImportError> {
        let mut desc = entry.clone();
        for _ in 0..3 {
            let bytes = self.read_layout_blob(source, &desc, MAX_JSON_SIZE)?;
            match parse_manifest(&bytes)
                .map_err(|e| self.malformed(format!("manifest {}: {e}", desc.digest)))?
            {
                Parsed::Manifest(m) => return Ok((desc.digest, bytes, m)),
                Parsed::Index(entries) => {
                    desc = select_platform(&entries)
                        .ok_or_else(|| {
                            self.malformed(format!(
                                "index {}: no linux/amd64 or wasm image",
                                desc.digest
                            ))
                        })?
                        .clone();
                }
            }
        }
        Err(self.malformed("image indexes nested too deeply"))
    }

    /// Reads a small layout blob into memory, verifying its digest.
    fn read_layout_blob(
        &self,
        source: &Source,
        desc: &Descriptor,
        max: u64,
    ) -> Result<Vec<u8>, ImportError> {
        let hex = sha256_hex(&desc.digest)
            .ok_or_else(|| self.blob_err(BlobError::BadDigest(desc.digest.clone())))?;
        let bytes = source.read_limited(self, &format!("blobs/sha256/{hex}"), max)?;
        let actual = sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(self.blob_err(BlobError::Mismatch {
                expected: desc.digest.clone(),
                actual,
            }));
        }
        Ok(bytes)
    }

    /// Copies a layout blob into the store (verifying its digest); with `max`, also returns its
    /// content (configs).
    fn layout_blob(
        &self,
        source: &Source,
        desc: &Descriptor,
        max: Option<u64>,
    ) -> Result<Vec<u8>, ImportError> {
        let hex = sha256_hex(&desc.digest)
            .ok_or_else(|| self.blob_err(BlobError::BadDigest(desc.digest.clone())))?;
        if let Some(max) = max {
            let bytes = self.read_layout_blob(source, desc, max)?;
            self.store
                .write_blob_bytes(&desc.digest, &bytes)
                .map_err(|e| self.blob_err(e))?;
            return Ok(bytes);
        }
        if !self.store.has_blob(&desc.digest) {
            let mut file = source.open(self, &format!("blobs/sha256/{hex}"))?;
            self.progress.started(&desc.digest, desc.size());
            let mut writer = self.store.blob_writer().map_err(|e| self.blob_err(e))?;
            self.copy_into(&mut file, &mut writer, &desc.digest)?;
            writer
                .commit(self.store, &desc.digest)
                .map_err(|e| self.blob_err(e))?;
        }
        Ok(Vec::new())
    }

    fn copy_into(
        &self,
        src: &mut dyn Read,
        writer: &mut crate::store::BlobWriter,
        label: &str,
    ) -> Result<(), ImportError> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(&self.path)(e)),
            };
            writer.write(&buf[..n]).map_err(|e| self.blob_err(e))?;
            self.progress.advanced(label, n as u64);
        }
    }

    /// Copies a docker-save layer (digest unknown up front) into the store and returns its
    /// digest, size and a media type matching its compression.
    fn copy_layer(
        &self,
        file: &mut File,
        name: &str,
    ) -> Result<(String, u64, &'static str), ImportError> {
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(self.io_err(&self.path))?;
        let media_type = match &magic[..n] {
            [0x1f, 0x8b, ..] => OCI_LAYER_GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => OCI_LAYER_ZSTD,
            _ => OCI_LAYER_TAR,
        };
        self.progress
            .started(name, file.metadata().ok().map(|m| m.len()));
        let mut writer = self.store.blob_writer().map_err(|e| self.blob_err(e))?;
        writer.write(&magic[..n]).map_err(|e| self.blob_err(e))?;
        self.copy_into(file, &mut writer, name)?;
        let size = writer.written();
        let digest = writer.digest();
        writer
            .commit(self.store, &digest)
            .map_err(|e| self.blob_err(e))?;
        Ok((digest, size, media_type))
    }

    fn check_config(
        &self,
        digest: &str,
        parsed: Result<ParsedConfig, String>,
        layers: usize,
    ) -> Result<ParsedConfig, ImportError> {
        let parsed = parsed.map_err(|e| self.malformed(format!("config {digest}: {e}")))?;
        if parsed.diff_ids.len() != layers {
            return Err(self.malformed(format!(
                "config {digest} lists {} diff_ids for {layers} layers",
                parsed.diff_ids.len()
            )));
        }
        if let Some(bad) = parsed.diff_ids.iter().find(|d| sha256_hex(d).is_none()) {
            return Err(self.blob_err(BlobError::BadDigest(bad.clone())));
        }
        Ok(parsed)
    }

    fn normalize_refs(&self, names: impl IntoIterator<Item = String>) -> Vec<String> {
        names
            .into_iter()
            .filter_map(|n| match normalize_reference(&n) {
                Ok(r) => Some(r),
                Err(e) => {
                    self.progress.message(&format!("ignoring tag: {e}"));
                    None
                }
            })
            .collect()
    }

    /// Unpacks the layers (all blobs are in the store by now) and records the image.
    fn finish(
        &self,
        manifest_digest: String,
        manifest: &Manifest,
        parsed: ParsedConfig,
        config_size: usize,
        refs: Vec<String>,
    ) -> Result<Image, ImportError> {
        let mut layers = Vec::new();
        let per_layer = manifest
            .layers
            .iter()
            .zip(&parsed.diff_ids)
            .zip(&parsed.wasm_files);
        for ((layer, diff_id), wasm) in per_layer {
            self.store
                .ensure_layer(&layer.digest, diff_id, wasm.as_deref())
                .map_err(|source| ImportError::Layer {
                    path: self.path.clone(),
                    digest: layer.digest.clone(),
                    source,
                })?;
            self.progress.finished(&layer.digest);
            layers.push(LayerRecord {
                digest: layer.digest.clone(),
                diff_id: diff_id.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size().unwrap_or(0),
            });
        }
        let record = ImageRecord {
            id: manifest.config.digest.clone(),
            manifest_digest,
            config: parsed.config,
            size: config_size as u64 + layers.iter().map(|l| l.size).sum::<u64>(),
            layers,
        };
        let image = self
            .store
            .commit_image(record, &refs)
            .map_err(|e| self.store_err(e))?;
        self.progress
            .message(&format!("imported image {}", image.id));
        Ok(image)
    }
}

impl Source {
    /// Resolves an archive-relative name through the archive's links (bounded, to survive
    /// link loops) to a path inside `dir`.
    fn resolve(&self, ctx: &Import, name: &str) -> Result<PathBuf, ImportError> {
        let mut rel = normalize_rel(Path::new(name))
            .ok_or_else(|| ctx.malformed(format!("{name:?} points outside the image")))?;
        for _ in 0..16 {
            match self.links.get(&rel) {
                Some(target) => rel = target.clone(),
                None => return Ok(self.dir.join(rel)),
            }
        }
        Err(ctx.malformed(format!("{name:?}: too many levels of links")))
    }

    fn exists(&self, rel: &Path) -> bool {
        self.dir.join(rel).is_file() || self.links.contains_key(rel)
    }

    fn open(&self, ctx: &Import, name: &str) -> Result<File, ImportError> {
        let path = self.resolve(ctx, name)?;
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ctx.malformed(format!("{name:?} is missing"))
            } else {
                ctx.io_err(&path)(e)
            }
        })
    }

    fn read_limited(&self, ctx: &Import, name: &str, max: u64) -> Result<Vec<u8>, ImportError> {
        let file = self.open(ctx, name)?;
        let mut buf = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(ctx.io_err(&self.dir.join(name)))?;
        if buf.len() as u64 > max {
            return Err(ctx.malformed(format!("{name:?} is implausibly large")));
        }
        Ok(buf)
    }

    fn read_small(&self, ctx: &Import, name: &str) -> Result<Vec<u8>, ImportError> {
        self.read_limited(ctx, name, MAX_JSON_SIZE)
    }
}
