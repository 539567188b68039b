//! Read-only block images of stored images, for microVM guests.
//!
//! A guest cannot reach the host's layer directories, so each image becomes one
//! EROFS filesystem attached as a read-only virtio-blk disk. Its root holds the
//! unpacked layers side by side, bottom first:
//!
//! ```text
//! /layers/0/   bottom layer, as unpacked on the host (whiteouts, opaque xattrs)
//! /layers/1/
//! ...
//! ```
//!
//! so the guest mounts overlayfs with `lowerdir=/layers/N-1:…:/layers/0`,
//! exactly as the native runtime does with the host directories. Built once
//! per image id with Debian's `mkfs.erofs` (erofs-utils) and cached under
//! `block/sha256/<image-id-hex>.erofs`; removed with the image by GC.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::FlockArg;

use crate::store::{sha256_hex, ImageStore};
use crate::Image;

/// Directory, under the store root, of the cached block images.
pub(crate) const BLOCK_DIR: &str = "block/sha256";
/// Suffix of a cached block image file.
pub(crate) const BLOCK_SUFFIX: &str = ".erofs";
/// Directory inside the block image holding the numbered layers.
pub const BLOCK_LAYERS_DIR: &str = "layers";

#[derive(Debug, thiserror::Error)]
pub enum BlockImageError {
    #[error("image id {0:?} is not a sha256 digest")]
    BadId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("mkfs.erofs not found: install Debian's erofs-utils")]
    MkfsMissing,
    #[error("mkfs.erofs failed for image {image}: {stderr}")]
    Mkfs { image: String, stderr: String },
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    /// Wasm OCI artifacts (raw `application/wasm` layers) are for the wasm runtime only.
    #[error(
        "image {image} is a WebAssembly artifact (application/wasm layers): \
         the vm runtime cannot run it, use the wasm runtime"
    )]
    WasmArtifact { image: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlockImageError + '_ {
    move |source| BlockImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ImageStore {
    /// The EROFS block image of `image`, built now unless already cached.
    pub fn block_image(&self, image: &Image) -> Result<PathBuf, BlockImageError> {
        let hex = sha256_hex(&image.id).ok_or_else(|| BlockImageError::BadId(image.id.clone()))?;
        let dir = self.root().join(BLOCK_DIR);
        let path = dir.join(format!("{hex}{BLOCK_SUFFIX}"));
        let is_artifact = self.read_record(&image.id)?.is_some_and(|rec| {
            rec.layers
                .iter()
                .any(|l| crate::manifest::is_wasm_layer_media_type(&l.media_type))
        });
        if is_artifact {
            return Err(BlockImageError::WasmArtifact {
                image: image.id.clone(),
            });
        }
        if path.is_file() {
            return Ok(path);
        }
        // Shared like a pull: GC (exclusive) must not sweep the layers or the
        // half-built file under us; concurrent builders race only on the rename.
        let _content = self.lock_shared()?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let staging = tempfile::Builder::new()
            .prefix("block-")
            .tempdir_in(self.root().join("tmp"))
            .map_err(io_err(&self.root().join("tmp")))?;
        let tree = staging.path().join("tree");
        let layers = tree.join(BLOCK_LAYERS_DIR);
        fs::create_dir_all(&layers).map_err(io_err(&layers))?;
        for (index, layer) in image.layers.iter().enumerate() {
            link_tree(layer, &layers.join(index.to_string()))?;
        }
        let output = staging.path().join("image.erofs");
        let result = Command::new("mkfs.erofs")
            .arg("--quiet")
            // Fixed timestamps: the same layers give the same bytes.
            .arg("-T0")
            .arg(&output)
            .arg(&tree)
            .output();
        let out = match result {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlockImageError::MkfsMissing)
            }
            Err(e) => return Err(io_err(Path::new("mkfs.erofs"))(e)),
        };
        if !out.status.success() {
            return Err(BlockImageError::Mkfs {
                image: image.id.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        fs::rename(&output, &path).map_err(io_err(&path))?;
        Ok(path)
    }

    fn lock_shared(&self) -> Result<nix::fcntl::Flock<fs::File>, BlockImageError> {
        self.lock_file("lock", FlockArg::LockShared)?
            .ok_or_else(|| io_err(&self.root().join("lock"))(io::ErrorKind::WouldBlock.into()))
    }
}

/// Mirrors `from` at `to` with hard links: cheap, and keeps every inode's mode,
/// owner, device numbers (whiteouts) and xattrs (opaque dirs) for mkfs.erofs.
fn link_tree(from: &Path, to: &Path) -> Result<(), BlockImageError> {
    let status = Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err(Path::new("cp")))?;
    if !status.status.success() {
        return Err(BlockImageError::Io {
            path: from.to_path_buf(),
            source: io::Error::other(String::from_utf8_lossy(&status.stderr).trim().to_string()),
        });
    }
    Ok(())
}
