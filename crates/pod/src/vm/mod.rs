//! The vm runtime: each pod in its own microVM (`vmrun-vmm`), with the guest
//! agent (`vmrun-agent`, PID 1) building the containers inside.
//!
//! The host side here decides what the VM looks like (size, image disks) and
//! drives the agent over gRPC through the VMM's hybrid vsock; everything that
//! touches namespaces, cgroups and mounts happens in the guest.

mod container;
pub mod disks;
mod exec;
mod host_mounts;
pub mod network;
mod sandbox;
pub mod sizing;
mod stdin;
pub mod vmm_process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::plan::PodPlan;
use crate::runtime::{Runtime, RuntimeError, Sandbox};

pub use exec::exec_to_terminal;
pub use vmm_process::{VmAssets, VmFiles, VmmJail, GUEST_CMDLINE};

/// How long a guest may take from VMM start to a healthy agent, unless
/// `VMRUN_VM_BOOT_TIMEOUT` (seconds) says otherwise. Generous: nested test
/// setups boot in seconds, hardware KVM in well under one.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmRuntime {
    pub state_root: PathBuf,
    pub assets: VmAssets,
    /// The read-only block image (EROFS of the layers) of each image the
    /// pod uses, by the image reference its containers name.
    pub image_disks: BTreeMap<String, PathBuf>,
    /// Per-container pids limit, as native.
    pub pids_limit: Option<i64>,
    /// Upper bound on a pod VM's vCPUs (default: the host's CPUs).
    pub max_vcpus: Option<u8>,
    pub boot_timeout: Duration,
    /// Empty disk slots a pod VM boots with, for images its containers
    /// bring later ([`crate::runtime::Launch::block_image`]): CRI creates
    /// the VM at RunPodSandbox, before it knows any container. 0 for
    /// `vmrun run`, which knows every image when the VM boots.
    #[serde(default)]
    pub spare_disks: u8,
    /// The pod joins a CNI network after its VM boots (CRI): the VMM runs
    /// in a network namespace of its own holding the guest NIC's tap, for
    /// CNI to add the pod's interface to (see [`network`]). A hostNetwork
    /// pod keeps the guest's own network, loopback only.
    #[serde(default)]
    pub pod_network: bool,
    /// How each pod's VMM is jailed (on by default).
    #[serde(default)]
    pub jail: VmmJail,
}

impl VmRuntime {
    pub fn boot_timeout_from_env() -> Duration {
        std::env::var("VMRUN_VM_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_BOOT_TIMEOUT, Duration::from_secs)
    }
}

impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        "vm"
    }

    fn create_sandbox(&self, pod: &PodPlan) -> Result<Arc<dyn Sandbox>, RuntimeError> {
        self.assets.check().map_err(RuntimeError::Sandbox)?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            RuntimeError::Sandbox(
                "the vm runtime needs a tokio runtime to talk to its guest".into(),
            )
        })?;
        let sandbox = sandbox::VmSandbox::create(self, pod, handle)?;
        Ok(Arc::new(sandbox))
    }
}
