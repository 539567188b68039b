//! One error enum per store operation. Every message names what failed (reference, registry,
//! digest, file or layer entry) and fits on one line, because these end up verbatim in
//! Kubernetes events and CLI output.

use std::io;
use std::path::PathBuf;

/// An image reference that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid { reference: String, reason: String },
}

/// Opening (creating) the store directory failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("open image store {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Reading or changing the store's metadata failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("image store: corrupt {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("image {reference:?}: ambiguous image id prefix, matches {count} images")]
    Ambiguous { reference: String, count: usize },
    #[error("image {reference:?}: no such image")]
    NotFound { reference: String },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

/// Unpacking one layer archive failed. Entry names are the paths inside the layer tar.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {entry:?}: path is absolute or contains '..'")]
    UnsafePath { entry: String },
    #[error("entry {entry:?}: would be written through symlink {symlink:?}")]
    ThroughSymlink { entry: String, symlink: String },
    #[error("entry {entry:?}: hardlink target {target:?} is outside the layer")]
    HardlinkOutside { entry: String, target: String },
    #[error("entry {entry:?}: parent {parent:?} is not a directory")]
    NotADirectory { entry: String, parent: String },
    #[error("entry {entry:?}: unsupported tar entry type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("entry {entry:?}: {source}")]
    Entry { entry: String, source: io::Error },
    #[error("{entry}: tar headers (PAX records, GNU long name or link) take more than {} KiB", limit / 1024)]
    HeadersTooLarge { entry: String, limit: u64 },
    #[error("entry {entry:?}: a {kind} entry carries no data, but its header says {size} bytes")]
    DataOnHeaderOnly {
        entry: String,
        kind: String,
        size: u64,
    },
    #[error("entry {entry:?}: writing {}: {source}", path.display())]
    Write {
        entry: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("entry {entry:?}: the archive ends after {got} of its {size} bytes")]
    Truncated { entry: String, got: u64, size: u64 },
    #[error("malformed layer archive: {0}")]
    Archive(io::Error),
    #[error("unsupported layer media type {0:?}")]
    MediaType(String),
    #[error("uncompressed content is {actual}, but the image config says {expected}")]
    DiffIdMismatch { expected: String, actual: String },
    /// A stored raw wasm blob no longer hashes to its digest (the store was tampered with).
    #[error("wasm blob content is {actual}, but its digest is {expected}")]
    WasmDigestMismatch { expected: String, actual: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Pulling (or ensuring) an image failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The registry refused or could not be reached (`manifest unknown`, connection refused…).
    #[error("pull {reference}: {message}")]
    Registry { reference: String, message: String },
    /// `PullPolicy::Never` and the image is not in the store.
    #[error("image {reference} is not present locally and the pull policy is Never")]
    NotPresent { reference: String },
    /// The manifest, index or config is malformed or unsupported.
    #[error("pull {reference}: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("pull {reference}: blob {digest}: content digest is {actual}, refusing it")]
    DigestMismatch {
        reference: String,
        digest: String,
        actual: String,
    },
    /// Storing a fetched blob failed (a full disk): names the blob and the file.
    #[error("pull {reference}: blob {digest}: {source}")]
    BlobStore {
        reference: String,
        digest: String,
        source: StoreError,
    },
    #[error("pull {reference}: layer {digest}: {source}")]
    Layer {
        reference: String,
        digest: String,
        source: LayerError,
    },
    #[error("pull {reference}: {source}")]
    Store {
        reference: String,
        source: StoreError,
    },
}

/// Importing an image layout or archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("import {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "import {}: not an OCI image layout, oci-archive or docker-save archive",
        path.display()
    )]
    UnknownFormat { path: PathBuf },
    #[error("import {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("import {}: blob {digest}: content digest is {actual}, refusing it", path.display())]
    DigestMismatch {
        path: PathBuf,
        digest: String,
        actual: String,
    },
    #[error("import {}: layer {digest}: {source}", path.display())]
    Layer {
        path: PathBuf,
        digest: String,
        source: LayerError,
    },
    #[error("import {}: {source}", path.display())]
    Store { path: PathBuf, source: StoreError },
}

/// Writing a blob into the store failed (shared by pull and import, mapped into their errors).
#[derive(Debug)]
pub(crate) enum BlobError {
    Mismatch { expected: String, actual: String },
    BadDigest(String),
    TooLarge { expected: u64 },
    Store(StoreError),
}

/// `build_wasm` (a Wasm OCI artifact from a `.wasm` file) failed. Nothing is added to the
/// store when the file is refused.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("build-wasm {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("build-wasm {}: not a WebAssembly module or component: {found}", path.display())]
    NotWasm { path: PathBuf, found: String },
    #[error("build-wasm {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("build-wasm {}: layer {digest}: {source}", path.display())]
    Layer {
        path: PathBuf,
        digest: String,
        source: LayerError,
    },
    #[error("build-wasm {}: {source}", path.display())]
    Store { path: PathBuf, source: StoreError },
}

/// Pushing an image from the store to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("push {reference}: no such image in the store")]
    NotFound { reference: String },
    #[error("push {reference}: it is an image id, not a name; say where to push it (--to)")]
    NoTarget { reference: String },
    #[error("push {reference}: stored blob {digest}: {reason}")]
    Blob {
        reference: String,
        digest: String,
        reason: String,
    },
    #[error("push {reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("push {reference}: {source}")]
    Store {
        reference: String,
        source: StoreError,
    },
}
