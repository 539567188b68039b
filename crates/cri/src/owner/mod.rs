//! The sandbox owner: one detached process per pod (`vmrun-cri-shim`), the
//! parent of the pod's containers, serving the pod's RuntimeService calls
//! on `<pod dir>/owner.sock`.
//!
//! It lives as long as its pod, not as long as the daemon, so a restarted
//! `vmrun serve` still finds every pod, its containers' exit codes and its
//! logs. The daemon writes the pod's files below before it starts one:
//! `sandbox-config.pb` (the kubelet's PodSandboxConfig as it came) and
//! `owner.json` ([`OwnerSettings`]).

pub mod attach;
mod containers;
mod exec;
pub mod network;
mod pod;
mod service;
mod stats;

pub use network::{detach_orphan, NetworkSettings, NETNS_FILE};
pub use stats::filesystem_usage;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use prost::Message;
use serde::{Deserialize, Serialize};
use vmrun_pod::native::NativeRuntime;
use vmrun_pod::vm::VmRuntime;

use crate::api;
use crate::config::RuntimeKind;

pub use containers::state as container_state;
pub use pod::{sandbox_state, Owner};
pub use service::OwnerService;

pub const SETTINGS_FILE: &str = "owner.json";
pub const CONFIG_FILE: &str = "sandbox-config.pb";
pub const SOCKET_FILE: &str = "owner.sock";
pub const LOG_FILE: &str = "owner.log";

/// The JSON `info` of an owner's verbose status replies (what its pid,
/// network namespace and exec targets are).
pub fn verbose_info(info: &std::collections::HashMap<String, String>) -> serde_json::Value {
    info.get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or_default()
}

/// What the daemon decided for the pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerSettings {
    pub sandbox_id: String,
    /// The RuntimeClass handler the kubelet asked for.
    pub handler: String,
    pub runtime: RuntimeKind,
    /// The native runtime's settings; its state root is the pod's directory.
    pub native: NativeRuntime,
    /// The vm runtime's settings, for the `vm` handler; its state root is
    /// the pod's directory too.
    #[serde(default)]
    pub vm: Option<VmRuntime>,
    /// The image store, read to resolve the containers' images.
    pub image_root: PathBuf,
    /// The node's CNI setup; None leaves pods with loopback only (no
    /// network configuration on the node: Status says NetworkReady false).
    #[serde(default)]
    pub network: Option<NetworkSettings>,
    pub created_at: i64,
}

impl OwnerSettings {
    pub fn write(&self, dir: &Path, config: &api::PodSandboxConfig) -> std::io::Result<()> {
        std::fs::write(dir.join(CONFIG_FILE), config.encode_to_vec())?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(SETTINGS_FILE), json)
    }

    pub fn read(dir: &Path) -> anyhow::Result<(Self, api::PodSandboxConfig)> {
        let settings_path = dir.join(SETTINGS_FILE);
        let settings: Self = serde_json::from_slice(
            &std::fs::read(&settings_path)
                .with_context(|| format!("reading {}", settings_path.display()))?,
        )
        .with_context(|| format!("parsing {}", settings_path.display()))?;
        let config_path = dir.join(CONFIG_FILE);
        let config = api::PodSandboxConfig::decode(
            &std::fs::read(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?[..],
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        Ok((settings, config))
    }
}

/// The owner's life: make the sandbox, say `ok` on `ready` (or why not),
/// serve until the pod is removed.
pub async fn run(dir: PathBuf, mut ready: std::fs::File) -> anyhow::Result<()> {
    let owner = match Owner::create(&dir).await {
        Ok(owner) => Arc::new(owner),
        Err(e) => {
            let _ = writeln!(ready, "{e:#}");
            return Err(e);
        }
    };
    let socket = dir.join(SOCKET_FILE);
    let listener = match crate::unix::bind(&socket).await {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(ready, "binding {}: {e}", socket.display());
            owner.remove().await.ok();
            return Err(e.into());
        }
    };
    writeln!(ready, "ok")?;
    drop(ready);
    let done = owner.clone();
    tonic::transport::Server::builder()
        .add_service(api::runtime_service_server::RuntimeServiceServer::new(
            OwnerService::new(owner.clone()),
        ))
        .add_service(attach::proto::container_io_server::ContainerIoServer::new(
            attach::AttachService::new(owner),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move { done.removed().await },
        )
        .await
        .context("serving the sandbox owner's socket")?;
    Ok(())
}
