//! vmrun's configuration file (default `/etc/vmrun/config.toml`):
//!
//! ```toml
//! root = "/var/lib/vmrun"     # images and layers
//! state = "/run/vmrun"        # pods: records, logs, volumes
//! pids_limit = 4096           # per container
//! [registries]
//! insecure = ["registry.lan:5000"]
//! [vm]                        # the vm runtime; defaults shown
//! max_vcpus = <host CPUs>     # upper bound on a pod VM's vCPUs
//! vmm = "<dir of vmrun>/vmrun-vmm"
//! kernel = "<root>/guest/vmlinux"            # installed by scripts/build-guest
//! initramfs = "<root>/guest/initramfs.cpio"
//! jail = true                 # each VMM in a jail of its own (as root only)
//! jail_uid = 65534            # as whom a jailed VMM runs
//! jail_gid = 65534
//! [proc_view]                 # native containers' /proc/meminfo etc.; defaults shown
//! enabled = true              # pods opt out with annotation vmrun.io/proc-view: "false"
//! mountpoint = "/run/vmrun/procview"          # one per host, shared by all state roots
//! binary = "<dir of vmrun>/vmrun-procview"
//! [cri]                       # `vmrun serve`, see vmrun_cri::config
//! socket = "/run/vmrun/vmrun.sock"
//! [network]                   # `vmrun run`'s pods; unset: loopback only
//! cni_conf_dir = "/etc/cni/net.d"             # pods join the first network here
//! cni_bin_dirs = ["/usr/lib/cni", "/opt/cni/bin"]
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
    pub vm: VmConfig,
    pub proc_view: ProcViewConfig,
    pub network: NetworkConfig,
    /// `vmrun serve` (see `vmrun_cri::config`).
    pub cri: vmrun_cri::config::CriConfig,
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
            vm: VmConfig::default(),
            proc_view: ProcViewConfig::default(),
            network: NetworkConfig::default(),
            cri: vmrun_cri::config::CriConfig::default(),
            source: None,
        }
    }
}

/// The CNI network `vmrun run` puts pods on (`vmrun serve` has its own in
/// `[cri]`); without `cni_conf_dir` pods have loopback only.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni_conf_dir: None,
            cni_bin_dirs: vec![
                PathBuf::from(vmrun_cni::DEBIAN_BIN_DIR),
                PathBuf::from(vmrun_cni::DEFAULT_BIN_DIR),
            ],
        }
    }
}

/// Where the vm runtime finds its VMM and guest; unset means the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// Upper bound on a pod VM's vCPUs; default the host's CPUs.
    pub max_vcpus: Option<u8>,
    pub vmm: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// Each pod's VMM jailed in its VM directory (default on).
    pub jail: Option<bool>,
    pub jail_uid: Option<u32>,
    pub jail_gid: Option<u32>,
}

/// The host's /proc view daemon (see the `vmrun-procview` crate).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcViewConfig {
    pub enabled: bool,
    pub mountpoint: PathBuf,
    pub binary: Option<PathBuf>,
}

impl Default for ProcViewConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mountpoint: PathBuf::from(vmrun_procview::DEFAULT_MOUNTPOINT),
            binary: None,
        }
    }
}

/// A binary installed beside `vmrun`.
pub fn beside_vmrun(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

impl Config {
    /// The native runtime's /proc view, None when disabled.
    pub fn proc_view_setup(&self) -> Option<vmrun_pod::native::ProcViewSetup> {
        let c = &self.proc_view;
        c.enabled.then(|| vmrun_pod::native::ProcViewSetup {
            binary: c
                .binary
                .clone()
                .unwrap_or_else(|| beside_vmrun("vmrun-procview")),
            mountpoint: c.mountpoint.clone(),
        })
    }

    /// The CNI network `vmrun run`'s pods join, if one is configured.
    pub fn network_settings(&self) -> Option<vmrun_cni::NetworkSettings> {
        let conf_dir = self.network.cni_conf_dir.clone()?;
        Some(vmrun_cni::NetworkSettings {
            conf_dir,
            bin_dirs: self.network.cni_bin_dirs.clone(),
            cache_dir: self.state.join("cni-cache"),
        })
    }

    /// The vm runtime's files, defaults filled in.
    /// How the vm runtime jails its VMMs: the defaults but for what is set.
    pub fn vm_jail(&self) -> vmrun_pod::vm::VmmJail {
        let default = vmrun_pod::vm::VmmJail::default();
        vmrun_pod::vm::VmmJail {
            enabled: self.vm.jail.unwrap_or(default.enabled),
            uid: self.vm.jail_uid.unwrap_or(default.uid),
            gid: self.vm.jail_gid.unwrap_or(default.gid),
        }
    }

    pub fn vm_assets(&self) -> vmrun_pod::vm::VmAssets {
        let guest = self.root.join("guest");
        let vmm = self
            .vm
            .vmm
            .clone()
            .unwrap_or_else(|| beside_vmrun("vmrun-vmm"));
        vmrun_pod::vm::VmAssets {
            vmm,
            kernel: self
                .vm
                .kernel
                .clone()
                .unwrap_or_else(|| guest.join("vmlinux")),
            initramfs: self
                .vm
                .initramfs
                .clone()
                .unwrap_or_else(|| guest.join("initramfs.cpio")),
        }
    }

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
