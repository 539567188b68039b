//! ADD, DEL and CHECK of a network list, as libcni runs them: plugins in
//! order (DEL in reverse), each given the previous one's result.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::attachment::{format_cni_args, is_path_component, ArgsError, Attachment};
use crate::cache::{self, CacheEntry, CacheError};
use crate::config::{NetworkConfigList, PluginConfig};
use crate::exec::{run_plugin, ExecError};
use crate::plugin_error::PluginError;
use crate::result::{CniResult, ResultError};
use crate::runtime_config::RuntimeConfig;
use crate::version;

/// Where plugins are looked for unless told otherwise.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// Where Debian's containernetworking-plugins installs them.
pub const DEBIAN_BIN_DIR: &str = "/usr/lib/cni";
/// Where results are cached unless told otherwise (libcni's place).
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/cni/results";
/// How long one plugin run may take before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A CNI client: where plugins are, where results are kept, how long a
/// plugin may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cni {
    pub bin_dirs: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub plugin_timeout: Duration,
}

impl Default for Cni {
    fn default() -> Self {
        Cni {
            bin_dirs: vec![PathBuf::from(DEFAULT_BIN_DIR)],
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            plugin_timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What went wrong running one plugin; shared by the per-operation errors.
#[derive(Debug, thiserror::Error)]
pub enum PluginRunError {
    #[error("CNI plugin {plugin:?} of network {network:?} not found in {}", display_dirs(.dirs))]
    NotFound {
        plugin: String,
        network: String,
        dirs: Vec<PathBuf>,
    },
    #[error("CNI plugin {plugin:?} of network {network:?}: {source}")]
    Exec {
        plugin: String,
        network: String,
        source: ExecError,
    },
    #[error("CNI plugin {plugin:?} of network {network:?} failed {command}: {error}")]
    Failed {
        plugin: String,
        network: String,
        command: &'static str,
        error: PluginError,
    },
    #[error("CNI plugin {plugin:?} of network {network:?} failed {command} ({status}): {stderr}")]
    Exited {
        plugin: String,
        network: String,
        command: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "(no plugin directories configured)".into();
    }
    dirs.iter()
        .map(|dir| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An attachment that cannot be handed to plugins.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("container id {0:?} is not usable (empty, or contains '/')")]
    ContainerId(String),
    #[error("interface name {0:?} is not usable (1-15 characters, no '/')")]
    IfName(String),
    #[error("network name {0:?} is not usable (empty, or contains '/')")]
    Network(String),
    #[error(transparent)]
    Args(#[from] ArgsError),
}

/// Why ADD failed.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("ADD to network {network:?}: {source}")]
    Attachment {
        network: String,
        source: AttachmentError,
    },
    #[error(transparent)]
    Plugin(#[from] PluginRunError),
    #[error("CNI plugin {plugin:?} of network {network:?} printed an unusable result: {source}")]
    BadResult {
        plugin: String,
        network: String,
        source: ResultError,
    },
    #[error("ADD to network {network:?} succeeded but its result could not be cached: {source}")]
    Cache { network: String, source: CacheError },
}

/// Why DEL failed.
#[derive(Debug, thiserror::Error)]
pub enum DelError {
    #[error("DEL from network {network:?}: {source}")]
    Attachment {
        network: String,
        source: AttachmentError,
    },
    #[error(transparent)]
    Plugin(#[from] PluginRunError),
    #[error("DEL from network {network:?} succeeded but its cached result remains: {source}")]
    Cache { network: String, source: CacheError },
}

/// Why CHECK failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("CHECK of network {network:?}: {source}")]
    Attachment {
        network: String,
        source: AttachmentError,
    },
    #[error(
        "CHECK of network {network:?}: CNI version {version} has no CHECK (0.4.0 or later needed)"
    )]
    Unsupported { network: String, version: String },
    #[error("CHECK of network {network:?}: no cached ADD result for container {container_id} interface {ifname}")]
    NotAdded {
        network: String,
        container_id: String,
        ifname: String,
    },
    #[error("CHECK of network {network:?}: {source}")]
    Cache { network: String, source: CacheError },
    #[error(transparent)]
    Plugin(#[from] PluginRunError),
}

/// The three things a plugin is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// The stdin config for one plugin: its own object with the list's `name`
/// and `cniVersion`, the previous result, and `runtimeConfig` holding only
/// the capabilities it declares.
pub fn plugin_stdin(
    list: &NetworkConfigList,
    plugin: &PluginConfig,
    prev_result: Option<&Value>,
    attachment: &Attachment,
) -> Value {
    let mut config = plugin.raw.clone();
    config.insert("name".into(), Value::String(list.name.clone()));
    config.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev_result {
        config.insert("prevResult".into(), prev.clone());
    }
    if let Some(runtime) = attachment.runtime_config.for_plugin(plugin) {
        config.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    Value::Object(config)
}

/// Checks what will end up in plugin environments and cache file names.
fn check_attachment(
    list: &NetworkConfigList,
    attachment: &Attachment,
) -> Result<String, AttachmentError> {
    if !is_path_component(&list.name) {
        return Err(AttachmentError::Network(list.name.clone()));
    }
    if !is_path_component(&attachment.container_id) {
        return Err(AttachmentError::ContainerId(
            attachment.container_id.clone(),
        ));
    }
    // IFNAMSIZ is 16 with the terminating NUL.
    if !is_path_component(&attachment.ifname) || attachment.ifname.len() > 15 {
        return Err(AttachmentError::IfName(attachment.ifname.clone()));
    }
    Ok(format_cni_args(&attachment.args)?)
}

impl Cni {
    /// A client looking for plugins in `bin_dirs` and caching in `cache_dir`.
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        Cni {
            bin_dirs,
            cache_dir: cache_dir.into(),
            plugin_timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The plugin binary for `plugin_type`: the first executable file of
    /// that name in the plugin directories.
    pub fn find_plugin(&self, plugin_type: &str, network: &str) -> Result<PathBuf, PluginRunError> {
        let found = self
            .bin_dirs
            .iter()
            .map(|dir| dir.join(plugin_type))
            .find(|path| {
                std::fs::metadata(path)
                    .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            });
        found.ok_or_else(|| PluginRunError::NotFound {
            plugin: plugin_type.to_string(),
            network: network.to_string(),
            dirs: self.bin_dirs.clone(),
        })
    }

    fn cache_file(&self, list: &NetworkConfigList, attachment: &Attachment) -> PathBuf {
        cache::entry_path(
            &self.cache_dir,
            &list.name,
            &attachment.container_id,
            &attachment.ifname,
        )
    }

    /// Runs one plugin; its stdout on success.
    fn invoke(
        &self,
        command: Command,
        list: &NetworkConfigList,
        plugin: &PluginConfig,
        attachment: &Attachment,
        cni_args: &str,
        stdin: &Value,
    ) -> Result<Vec<u8>, PluginRunError> {
        let binary = self.find_plugin(&plugin.plugin_type, &list.name)?;
        let cni_path = std::env::join_paths(&self.bin_dirs)
            .map(|joined| joined.to_string_lossy().into_owned())
            .unwrap_or_default();
        let env = [
            ("CNI_COMMAND", command.as_str().to_string()),
            ("CNI_CONTAINERID", attachment.container_id.clone()),
            ("CNI_NETNS", attachment.netns.to_string_lossy().into_owned()),
            ("CNI_IFNAME", attachment.ifname.clone()),
            ("CNI_ARGS", cni_args.to_string()),
            ("CNI_PATH", cni_path),
        ];
        let input = stdin.to_string();
        tracing::debug!(
            plugin = %plugin.plugin_type,
            network = %list.name,
            command = command.as_str(),
            container = %attachment.container_id,
            "running CNI plugin"
        );
        let output =
            run_plugin(&binary, &env, input.as_bytes(), self.plugin_timeout).map_err(|source| {
                PluginRunError::Exec {
                    plugin: plugin.plugin_type.clone(),
                    network: list.name.clone(),
                    source,
                }
            })?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        if let Some(error) = PluginError::parse(&output.stdout) {
            return Err(PluginRunError::Failed {
                plugin: plugin.plugin_type.clone(),
                network: list.name.clone(),
                command: command.as_str(),
                error,
            });
        }
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        Err(PluginRunError::Exited {
            plugin: plugin.plugin_type.clone(),
            network: list.name.clone(),
            command: command.as_str(),
            status: output.status,
            stderr,
        })
    }

    /// Attaches the sandbox to the network and caches the result. When a
    /// plugin fails, what the earlier ones set up is torn down again (best
    /// effort DEL, as containerd does) so no address leaks.
    pub fn add(
        &self,
        list: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<CniResult, AddError> {
        let cni_args =
            check_attachment(list, attachment).map_err(|source| AddError::Attachment {
                network: list.name.clone(),
                source,
            })?;
        let outcome = self.add_plugins(list, attachment, &cni_args);
        if let Err(error) = &outcome {
            tracing::warn!("{error}; undoing the partial ADD");
            if let Err(undo) = self.del(list, attachment) {
                tracing::warn!("undoing the partial ADD failed: {undo}");
            }
        }
        outcome
    }

    fn add_plugins(
        &self,
        list: &NetworkConfigList,
        attachment: &Attachment,
        cni_args: &str,
    ) -> Result<CniResult, AddError> {
        let chaining = version::has_chaining(&list.cni_version);
        let mut result: Option<CniResult> = None;
        for plugin in &list.plugins {
            let prev = result.as_ref().filter(|_| chaining).map(|r| &r.raw);
            let stdin = plugin_stdin(list, plugin, prev, attachment);
            let stdout = self.invoke(Command::Add, list, plugin, attachment, cni_args, &stdin)?;
            let parsed = CniResult::from_bytes(&stdout).map_err(|source| AddError::BadResult {
                plugin: plugin.plugin_type.clone(),
                network: list.name.clone(),
                source,
            })?;
            result = Some(parsed);
        }
        // from_bytes already refused an empty plugin list.
        let result = result.unwrap_or_default();
        let entry = CacheEntry::new(
            &list.name,
            &attachment.container_id,
            &attachment.ifname,
            list.to_value(),
            attachment.args.clone(),
            attachment.runtime_config.clone(),
            result.raw.clone(),
        );
        cache::store(&self.cache_file(list, attachment), &entry).map_err(|source| {
            AddError::Cache {
                network: list.name.clone(),
                source,
            }
        })?;
        Ok(result)
    }

    /// The result ADD cached for this attachment, if any (e.g. for pod IPs
    /// after a runtime restart).
    pub fn cached_result(
        &self,
        list: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<Option<CniResult>, CacheError> {
        let file = self.cache_file(list, attachment);
        let Some(entry) = cache::load(&file)? else {
            return Ok(None);
        };
        CniResult::from_value(entry.result)
            .map(Some)
            .map_err(|error| CacheError::Malformed {
                file,
                reason: error.to_string(),
            })
    }

    /// Detaches the sandbox: plugins in reverse order, with the cached result
    /// as `prevResult`, and ADD's runtime configuration when `attachment`
    /// carries none. Idempotent: no cache entry, a second DEL or a netns
    /// that is gone are passed on to the plugins, which treat them as done.
    /// The cache entry is kept when a plugin fails, so a retry has it.
    pub fn del(&self, list: &NetworkConfigList, attachment: &Attachment) -> Result<(), DelError> {
        let cni_args =
            check_attachment(list, attachment).map_err(|source| DelError::Attachment {
                network: list.name.clone(),
                source,
            })?;
        let file = self.cache_file(list, attachment);
        let cached = match cache::load(&file) {
            Ok(entry) => entry,
            Err(error) => {
                // A damaged cache must not block teardown: plugins can
                // delete without prevResult.
                tracing::warn!("{error}; deleting without prevResult");
                None
            }
        };
        let prev = cached
            .as_ref()
            .map(|entry| &entry.result)
            .filter(|_| version::has_prev_result_on_del(&list.cni_version));
        // A caller that no longer knows the pod's settings (e.g. after a
        // restart) gets those ADD used.
        let mut attachment = attachment.clone();
        if attachment.runtime_config == RuntimeConfig::default() {
            if let Some(runtime) = cached.as_ref().and_then(|e| e.runtime_config.clone()) {
                attachment.runtime_config = runtime;
            }
        }
        let attachment = &attachment;
        for plugin in list.plugins.iter().rev() {
            let stdin = plugin_stdin(list, plugin, prev, attachment);
            self.invoke(Command::Del, list, plugin, attachment, &cni_args, &stdin)?;
        }
        cache::remove(&file).map_err(|source| DelError::Cache {
            network: list.name.clone(),
            source,
        })
    }

    /// Asks every plugin whether the attachment is still as ADD left it.
    pub fn check(
        &self,
        list: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<(), CheckError> {
        let network = || list.name.clone();
        let cni_args =
            check_attachment(list, attachment).map_err(|source| CheckError::Attachment {
                network: network(),
                source,
            })?;
        if !version::has_prev_result_on_del(&list.cni_version) {
            return Err(CheckError::Unsupported {
                network: network(),
                version: list.cni_version.clone(),
            });
        }
        if list.disable_check {
            return Ok(());
        }
        let entry = cache::load(&self.cache_file(list, attachment))
            .map_err(|source| CheckError::Cache {
                network: network(),
                source,
            })?
            .ok_or_else(|| CheckError::NotAdded {
                network: network(),
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
            })?;
        for plugin in &list.plugins {
            let stdin = plugin_stdin(list, plugin, Some(&entry.result), attachment);
            self.invoke(Command::Check, list, plugin, attachment, &cni_args, &stdin)?;
        }
        Ok(())
    }
}
