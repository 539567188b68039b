//! vmrun's configuration file (default `/etc/vmrun/config.toml`):
//!
//! ```toml
//! root = "/var/lib/vmrun"     # images and layers
//! state = "/run/vmrun"        # pods: records, logs, volumes
//! pids_limit = 4096           # per container
//! [registries]
//! insecure = ["registry.lan:5000"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use vmrun_image::RegistryConfig;

pub const DEFAULT_CONFIG: &str = "/etc/vmrun/config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub root: PathBuf,
    pub state: PathBuf,
    pub pids_limit: Option<i64>,
    pub registries: RegistryConfig,
    /// The file this was read from, handed on to a detached supervisor.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/vmrun"),
            state: PathBuf::from("/run/vmrun"),
            pids_limit: Some(4096),
            registries: RegistryConfig::default(),
            source: None,
        }
    }
}

impl Config {
    /// Reads the file; a missing default file means defaults, a missing explicit one is an error.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut config: Self = toml::from_str(&text)
                    .with_context(|| format!("config file {}", path.display()))?;
                config.source = Some(path);
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("config file {}", path.display())),
        }
    }
}
