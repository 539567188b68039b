//! Network configuration lists (`*.conflist`) and single-plugin configurations
//! (`*.conf`, `*.json`) as the CNI 1.0 specification and libcni read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Why one configuration document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the top level is not a JSON object")]
    NotAnObject,
    #[error("field `{0}` is missing or not a string")]
    MissingString(&'static str),
    #[error("network name {0:?} is not usable (it must be non-empty and contain no '/')")]
    BadName(String),
    #[error("field `plugins` is missing or not an array")]
    MissingPlugins,
    #[error("field `plugins` is empty")]
    NoPlugins,
    #[error("plugin {index}: {reason}")]
    BadPlugin { index: usize, reason: String },
}

/// Why no network configuration could be loaded from a directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read network config directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("no network config in {dir} (looked for *.conflist, *.conf, *.json)")]
    NoConfig { dir: PathBuf },
    #[error("no valid network config in {dir}: {}", describe_failures(.failures))]
    AllInvalid {
        dir: PathBuf,
        failures: Vec<FileError>,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

/// One configuration file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read network config {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed network config {file}: {source}")]
    Parse { file: PathBuf, source: ParseError },
}

fn describe_failures(failures: &[FileError]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One plugin of a list: its `type`, the capabilities it declares and the
/// whole object as written, which is what the plugin gets on stdin (with the
/// runtime's fields injected).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub plugin_type: String,
    /// `capabilities` entries set to `true`; only these get `runtimeConfig`.
    pub capabilities: BTreeMap<String, bool>,
    pub raw: Map<String, Value>,
}

impl PluginConfig {
    /// Whether the plugin asked for runtime configuration `capability`.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.get(capability).copied().unwrap_or(false)
    }

    fn from_value(index: usize, value: &Value) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::BadPlugin {
            index,
            reason: reason.to_string(),
        };
        let raw = value
            .as_object()
            .ok_or_else(|| bad("not a JSON object"))?
            .clone();
        let plugin_type = raw
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("field `type` is missing or not a string"))?
            .to_string();
        // The type names a binary in the plugin directories: a path would
        // let a config escape them.
        if plugin_type.is_empty() || plugin_type.contains('/') || plugin_type.starts_with('.') {
            return Err(bad(&format!("type {plugin_type:?} is not a plugin name")));
        }
        let mut capabilities = BTreeMap::new();
        match raw.get("capabilities") {
            None | Some(Value::Null) => {}
            Some(Value::Object(caps)) => {
                for (key, enabled) in caps {
                    let enabled = enabled
                        .as_bool()
                        .ok_or_else(|| bad(&format!("capability {key:?} is not a boolean")))?;
                    capabilities.insert(key.clone(), enabled);
                }
            }
            Some(_) => return Err(bad("field `capabilities` is not an object")),
        }
        Ok(PluginConfig {
            plugin_type,
            capabilities,
            raw,
        })
    }
}

/// A network: its name, the CNI version its plugins speak and the plugins in
/// the order ADD runs them.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    /// `disableCheck`: CHECK is a no-op for this network.
    pub disable_check: bool,
    pub plugins: Vec<PluginConfig>,
    /// The file it came from, when loaded from a directory.
    pub source: Option<PathBuf>,
}

impl NetworkConfigList {
    /// Parses a network configuration list (the `*.conflist` format).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        let value: Value = serde_json::from_slice(bytes)?;
        let top = value.as_object().ok_or(ParseError::NotAnObject)?;
        let (name, cni_version) = name_and_version(top)?;
        let plugins = top
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or(ParseError::MissingPlugins)?;
        if plugins.is_empty() {
            return Err(ParseError::NoPlugins);
        }
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(index, plugin)| PluginConfig::from_value(index, plugin))
            .collect::<Result<Vec<_>, _>>()?;
        let disable_check = top
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check,
            plugins,
            source: None,
        })
    }

    /// Parses a single-plugin configuration (the `*.conf` format) and wraps it
    /// into a list of one, as libcni's ConfListFromConf does.
    pub fn from_single_plugin_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        let value: Value = serde_json::from_slice(bytes)?;
        let top = value.as_object().ok_or(ParseError::NotAnObject)?;
        let (name, cni_version) = name_and_version(top)?;
        let plugin = PluginConfig::from_value(0, &value)?;
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check: false,
            plugins: vec![plugin],
            source: None,
        })
    }

    /// Reads one file: `*.conflist` as a list, anything else as a single plugin.
    pub fn from_file(file: &Path) -> Result<Self, FileError> {
        let bytes = std::fs::read(file).map_err(|source| FileError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let parsed = if file.extension().is_some_and(|ext| ext == "conflist") {
            Self::from_bytes(&bytes)
        } else {
            Self::from_single_plugin_bytes(&bytes)
        };
        let mut list = parsed.map_err(|source| FileError::Parse {
            file: file.to_path_buf(),
            source,
        })?;
        list.source = Some(file.to_path_buf());
        Ok(list)
    }

    /// The list as a JSON document, for the result cache.
    pub fn to_value(&self) -> Value {
        let mut top = Map::new();
        top.insert("name".into(), Value::String(self.name.clone()));
        top.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if self.disable_check {
            top.insert("disableCheck".into(), Value::Bool(true));
        }
        top.insert(
            "plugins".into(),
            Value::Array(
                self.plugins
                    .iter()
                    .map(|p| Value::Object(p.raw.clone()))
                    .collect(),
            ),
        );
        Value::Object(top)
    }
}

fn name_and_version(top: &Map<String, Value>) -> Result<(String, String), ParseError> {
    let name = top
        .get("name")
        .and_then(Value::as_str)
        .ok_or(ParseError::MissingString("name"))?;
    // The name becomes part of result cache file names.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ParseError::BadName(name.to_string()));
    }
    let version = top
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or(ParseError::MissingString("cniVersion"))?;
    Ok((name.to_string(), version.to_string()))
}

/// The configuration files of `conf_dir` that CNI considers, sorted by name.
pub fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(conf_dir).map_err(|source| LoadError::ReadDir {
        dir: conf_dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::ReadDir {
            dir: conf_dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| matches!(ext, "conflist" | "conf" | "json"));
        // Follows symlinks: config managers often link files in.
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The network the runtime uses: the first valid file of `conf_dir` by name.
/// Malformed files before it are skipped with a warning (a half-written file
/// of a network daemon must not take pods down); when none is valid the
/// error names every file and what is wrong with it.
pub fn load_default(conf_dir: &Path) -> Result<NetworkConfigList, LoadError> {
    let files = config_files(conf_dir)?;
    if files.is_empty() {
        return Err(LoadError::NoConfig {
            dir: conf_dir.to_path_buf(),
        });
    }
    let mut failures = Vec::new();
    for file in files {
        match NetworkConfigList::from_file(&file) {
            Ok(list) => {
                for failure in &failures {
                    tracing::warn!("skipping {failure}");
                }
                return Ok(list);
            }
            Err(error) => failures.push(error),
        }
    }
    Err(LoadError::AllInvalid {
        dir: conf_dir.to_path_buf(),
        failures,
    })
}
