//! A pod on the node's CNI network, as containerd wires it: the network
//! namespace of the process holding it pinned in the pod's directory, ADD of
//! the node's default network configuration, DEL (idempotent) and the pin
//! removed at the end. Shared by `vmrun serve` and `vmrun run`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AddError, Attachment, Cni, DelError, LoadError, NetNs, NetNsError, NetworkConfigList};

/// The interface CNI creates in the pod, as kubelet and containerd name it.
pub const POD_INTERFACE: &str = "eth0";
/// Where the pod's namespace is pinned, inside its directory.
pub const NETNS_FILE: &str = "netns";

/// The node's CNI setup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSettings {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    /// libcni's result cache (for DEL after a restart).
    pub cache_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network: {0}")]
    Load(#[from] LoadError),
    #[error("pod network: {0}")]
    Pin(#[from] NetNsError),
    #[error("pod network: {0}")]
    Add(#[from] AddError),
    #[error("pod network: {0}")]
    Del(#[from] DelError),
}

/// A pod attached to the node's network.
pub struct PodNetwork {
    cni: Cni,
    list: NetworkConfigList,
    attachment: Attachment,
    netns: NetNs,
    pub ips: Vec<IpAddr>,
}

impl PodNetwork {
    /// Pins the namespace of `holder_pid` at `dir/netns` and attaches it
    /// with the attachment `describe` makes for that path; on failure
    /// nothing stays attached or pinned.
    pub fn attach(
        settings: &NetworkSettings,
        dir: &Path,
        holder_pid: i32,
        describe: impl FnOnce(&Path) -> Attachment,
    ) -> Result<Self, NetworkError> {
        let list = crate::load_default(&settings.conf_dir)?;
        let cni = Cni::new(settings.bin_dirs.clone(), settings.cache_dir.clone());
        let netns = NetNs::pin_process(holder_pid as u32, dir.join(NETNS_FILE))?;
        let attachment = describe(netns.path());
        match cni.add(&list, &attachment) {
            Ok(result) => Ok(Self {
                ips: result.pod_ips(),
                cni,
                list,
                attachment,
                netns,
            }),
            Err(e) => {
                let _ = netns.remove();
                Err(e.into())
            }
        }
    }

    /// Where the pod's network namespace is pinned.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// DEL, then the pin goes; repeatable (CNI DEL is idempotent).
    pub fn detach(&self) -> Result<(), NetworkError> {
        self.cni.del(&self.list, &self.attachment)?;
        crate::netns::remove(self.netns.path())?;
        Ok(())
    }
}

/// Detaches a pod whose holder is gone, from its files alone: the pinned
/// namespace at `dir/netns` (if still there) and the node's configuration.
pub fn detach_orphan(
    settings: &NetworkSettings,
    dir: &Path,
    describe: impl FnOnce(&Path) -> Attachment,
) -> Result<(), NetworkError> {
    let list = crate::load_default(&settings.conf_dir)?;
    let cni = Cni::new(settings.bin_dirs.clone(), settings.cache_dir.clone());
    let netns = dir.join(NETNS_FILE);
    cni.del(&list, &describe(&netns))?;
    crate::netns::remove(&netns)?;
    Ok(())
}
