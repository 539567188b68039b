//! OCI image store: pulls images from registries, imports them from local files, keeps the
//! content-addressed blobs and the unpacked (overlayfs-format) layers under one root directory.
//!
//! On-disk layout under the store root (default `/var/lib/vmrun`):
//!
//! ```text
//! blobs/sha256/<hex>            manifests, configs and compressed layers, digest-verified
//! layers/sha256/<diff-id-hex>/  unpacked layers, shared between images (overlayfs lowerdirs)
//! images/sha256/<hex>.json      one record per image, keyed by image id (config digest)
//! images/index.json             normalized reference -> image id
//! block/sha256/<id-hex>.erofs  read-only EROFS image of an image's layers, for microVMs
//! tmp/                          downloads and unpacks in progress (renamed into place when done)
//! lock                          store lock: shared while writing content, exclusive for GC
//! images/index.lock             serializes read-modify-write of images/index.json
//! ```

mod block;
mod error;
mod import;
mod manifest;
mod pull;
mod push;
mod reference;
mod store;
mod unpack;
mod wasm;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use block::{BlockImageError, BLOCK_LAYERS_DIR};
pub use error::{
    BuildError, ImportError, LayerError, OpenError, PullError, PushError, ReferenceError,
    StoreError,
};
pub use reference::normalize_reference;
pub use store::ImageStore;
pub use wasm::{wasm_kind, WasmKind};

/// Default store root.
pub const DEFAULT_ROOT: &str = "/var/lib/vmrun";

/// Registry access settings, read from the `[registries]` section of vmrun's TOML config.
///
/// ```toml
/// [registries]
/// insecure = ["registry.lan:5000"]
/// [registries.auth."registry.lan:5000"]
/// username = "me"
/// password = "secret"
/// [registries.mirrors]
/// "docker.io" = ["http://mirror.lan:5000"]
/// ```
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`) spoken to over plain HTTP. `localhost`, `127.0.0.1`
    /// and `[::1]` always are.
    pub insecure: Vec<String>,
    /// Credentials per registry (`host` or `host:port`; Docker Hub as `docker.io`).
    pub auth: BTreeMap<String, Credentials>,
    /// Endpoints tried, in order, before a registry itself, as containerd's
    /// `registry.mirrors` (`host` → `["http://host:port", "host:port"]`;
    /// `http://` means plain HTTP). Images keep their own names.
    pub mirrors: BTreeMap<String, Vec<String>>,
}

impl RegistryConfig {
    /// Extracts the `[registries]` table from a whole vmrun TOML config file; a file without one
    /// yields the default (anonymous, TLS everywhere except localhost).
    pub fn from_config_toml(text: &str) -> Result<Self, toml::de::Error> {
        #[derive(Deserialize)]
        struct Whole {
            #[serde(default)]
            registries: RegistryConfig,
        }
        Ok(toml::from_str::<Whole>(text)?.registries)
    }
}

/// Username/password for a registry (HTTP basic, or exchanged for a bearer token when the
/// registry asks for one).
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password (configs end up in debug logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Kubernetes `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Progress callbacks of a pull or import. `digest` is the blob being transferred.
pub trait PullProgress: Send + Sync {
    /// A blob download (or copy, for imports) starts; `size` is the expected size if known.
    fn started(&self, digest: &str, size: Option<u64>);
    /// `bytes` more bytes of the blob arrived (a delta, not a running total).
    fn advanced(&self, digest: &str, bytes: u64);
    /// The blob is stored (and, for layers, unpacked).
    fn finished(&self, digest: &str);
    /// A free-form status line (resolved digest, layer already present, ...).
    fn message(&self, msg: &str);
}

/// A [`PullProgress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn started(&self, _digest: &str, _size: Option<u64>) {}
    fn advanced(&self, _digest: &str, _bytes: u64) {}
    fn finished(&self, _digest: &str) {}
    fn message(&self, _msg: &str) {}
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Image id: the digest of the config blob (`sha256:…`).
    pub id: String,
    /// Normalized references pointing at this image (may be empty for an untagged image).
    pub references: Vec<String>,
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Unpacked layer directories, bottom layer first (overlayfs lowerdirs are given top first).
    pub layers: Vec<PathBuf>,
    /// Bytes of the config and compressed layer blobs, as the registry reports image size.
    pub size: u64,
}

/// The runtime-relevant part of an image config (`config` in the OCI/Docker config JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `"80/tcp"` style keys of `ExposedPorts`.
    pub exposed_ports: Vec<String>,
    /// The config's `os`: `linux`, or `wasip1`/`wasip2`/`wasi` for WebAssembly images
    /// (empty when the config does not say, and in records written before it was kept).
    #[serde(default)]
    pub os: String,
    /// The config's `architecture`: `amd64`, or `wasm` (empty when not given).
    #[serde(default)]
    pub architecture: String,
}

/// Entry points for the fuzz targets in `fuzz/`: the parsers of what a
/// registry or an archive hands the store, called as the store calls them.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// A manifest or index, as a pull reads it.
    pub fn parse_manifest(bytes: &[u8]) -> Result<(), String> {
        crate::manifest::parse_manifest(bytes).map(drop)
    }

    /// An image config, as a pull reads it.
    pub fn parse_config(bytes: &[u8]) -> Result<(), String> {
        crate::manifest::parse_config(bytes).map(drop)
    }

    /// A layer blob (tar, gzip or zstd) unpacked into `dest` through `tmp`.
    pub fn unpack_layer(blob: &Path, tmp: &Path, dest: &Path) -> Result<(), String> {
        crate::unpack::unpack_layer(blob, "sha256:unchecked", tmp, dest).map_err(|e| e.to_string())
    }
}
