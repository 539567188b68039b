//! The result cache: what ADD returned for (network, container, interface),
//! kept so that DEL and CHECK can give plugins their `prevResult` even after
//! a runtime restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::runtime_config::RuntimeConfig;

const KIND: &str = "vmrunCniCacheV1";

/// One cached attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    pub kind: String,
    pub network_name: String,
    pub container_id: String,
    pub if_name: String,
    /// The network list as ADD ran it.
    pub config: Value,
    pub cni_args: Vec<(String, String)>,
    /// What ADD offered the plugins, for a DEL that is given none (portmap
    /// needs its mappings to remove them).
    #[serde(default)]
    pub runtime_config: Option<RuntimeConfig>,
    pub result: Value,
}

impl CacheEntry {
    pub fn new(
        network_name: &str,
        container_id: &str,
        if_name: &str,
        config: Value,
        cni_args: Vec<(String, String)>,
        runtime_config: RuntimeConfig,
        result: Value,
    ) -> Self {
        CacheEntry {
            kind: KIND.into(),
            network_name: network_name.into(),
            container_id: container_id.into(),
            if_name: if_name.into(),
            config,
            cni_args,
            runtime_config: Some(runtime_config),
            result,
        }
    }
}

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot write CNI result cache {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read CNI result cache {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI result cache {file} is malformed: {reason}")]
    Malformed { file: PathBuf, reason: String },
    #[error("cannot remove CNI result cache {file}: {source}")]
    Remove {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// The file of one attachment. Callers have checked that the three names
/// are single path components.
pub fn entry_path(cache_dir: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    cache_dir.join(format!("{network}-{container_id}-{ifname}.json"))
}

/// Writes `entry` atomically: a crash leaves the old entry or the new one.
pub fn store(file: &Path, entry: &CacheEntry) -> Result<(), CacheError> {
    let write_error = |source| CacheError::Write {
        file: file.to_path_buf(),
        source,
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(write_error)?;
    }
    let bytes = serde_json::to_vec(entry).map_err(|e| write_error(std::io::Error::other(e)))?;
    // Unique per writer, so two concurrent stores never share a temp file.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let mut temp = file.as_os_str().to_owned();
    temp.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, bytes).map_err(write_error)?;
    std::fs::rename(&temp, file).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        write_error(source)
    })
}

/// The entry at `file`, `None` when there is none.
pub fn load(file: &Path) -> Result<Option<CacheEntry>, CacheError> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Read {
                file: file.to_path_buf(),
                source,
            })
        }
    };
    let entry: CacheEntry =
        serde_json::from_slice(&bytes).map_err(|error| CacheError::Malformed {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
    if entry.kind != KIND {
        return Err(CacheError::Malformed {
            file: file.to_path_buf(),
            reason: format!("kind {:?} is not {KIND}", entry.kind),
        });
    }
    Ok(Some(entry))
}

/// Removes the entry at `file`; no entry is fine.
pub fn remove(file: &Path) -> Result<(), CacheError> {
    match std::fs::remove_file(file) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove {
            file: file.to_path_buf(),
            source,
        }),
    }
}
