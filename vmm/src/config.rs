//! The VM's configuration: what the command line (or a JSON file) asks for,
//! validated before any hypervisor resource is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::mptable::MAX_CPUS;
use crate::virtio_slots::MAX_VIRTIO_DEVICES;

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Below this even a tiny kernel (loaded at 16 MiB) has no room to boot.
pub const MIN_MEMORY_MIB: u64 = 32;
/// An upper bound that catches unit mistakes (GiB given as MiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    #[default]
    Stdio,
    Off,
    File(PathBuf),
}

impl std::str::FromStr for ConsoleConfig {
    type Err = std::convert::Infallible;

    /// `stdio`, `off`, or a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdio" => ConsoleConfig::Stdio,
            "off" => ConsoleConfig::Off,
            path => ConsoleConfig::File(PathBuf::from(path)),
        })
    }
}

/// A disk image given to the guest as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH,ro`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, option)) => return Err(format!("unknown disk option {option:?} (ro or rw)")),
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// The guest's vsock device, bridged to host unix sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more: 0-2 are reserved).
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
    /// Host clients connect here; guest connects to host port P reach
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
}

pub const DEFAULT_GUEST_CID: u64 = 3;
/// sizeof(sun_path) minus the terminating NUL.
const MAX_UDS_PATH: usize = 107;

fn default_guest_cid() -> u64 {
    DEFAULT_GUEST_CID
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// `PATH` or `PATH,cid=N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("empty vsock socket path".into());
        }
        let mut guest_cid = DEFAULT_GUEST_CID;
        for option in parts {
            match option.split_once('=') {
                Some(("cid", value)) => {
                    guest_cid = value
                        .parse()
                        .map_err(|_| format!("invalid vsock cid {value:?}"))?
                }
                _ => return Err(format!("unknown vsock option {option:?} (cid=N)")),
            }
        }
        Ok(VsockConfig {
            guest_cid,
            uds_path: PathBuf::from(path),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The control socket (line-delimited JSON), if any.
    #[serde(default)]
    pub api: Option<PathBuf>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: ConsoleConfig::default(),
            disks: Vec::new(),
            vsock: None,
            api: None,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks everything that can be checked without a hypervisor.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_CPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemorySize(self.memory_mib));
        }
        let check_file = |path: &PathBuf, what| match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(ConfigError::NotAFile {
                what,
                path: path.clone(),
            }),
            Err(source) => Err(ConfigError::Missing {
                what,
                path: path.clone(),
                source,
            }),
        };
        check_file(&self.kernel, "kernel")?;
        if let Some(initrd) = &self.initrd {
            check_file(initrd, "initrd")?;
        }
        let devices = self.disks.len() + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(api) = &self.api {
            let len = api.as_os_str().len();
            if len == 0 || len > MAX_UDS_PATH {
                return Err(ConfigError::ApiPath(api.clone()));
            }
        }
        for disk in &self.disks {
            check_file(&disk.path, "disk")?;
        }
        if self.cmdline.len() >= crate::arch::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if let ConsoleConfig::File(path) = &self.console {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyConsolePath);
            }
        }
        Ok(())
    }
}

impl VsockConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
        if self.guest_cid < 3 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH {
            return Err(ConfigError::VsockPath(self.uds_path.clone()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_CPUS}, not {0}")]
    VcpuCount(u8),
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, not {0} MiB")]
    MemorySize(u64),
    #[error("{what} {path}: {source}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("kernel command line is {0} bytes; the limit is 2047")]
    CmdlineTooLong(usize),
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices fit, not {0}")]
    TooManyDevices(usize),
    #[error("console file path is empty")]
    EmptyConsolePath,
    #[error("vsock guest cid must be between 3 and 4294967294, not {0}")]
    VsockCid(u64),
    #[error("vsock socket path {0:?} must be 1 to 107 bytes long")]
    VsockPath(PathBuf),
    #[error("control socket path {0:?} must be 1 to 107 bytes long")]
    ApiPath(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_kernel() -> (tempfile::NamedTempFile, VmConfig) {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let config = VmConfig::new(kernel.path());
        (kernel, config)
    }

    #[test]
    fn defaults_are_valid() {
        let (_kernel, config) = with_kernel();
        config.validate().unwrap();
    }

    #[test]
    fn rejects_bad_vcpu_counts_and_memory_sizes() {
        let (_kernel, mut config) = with_kernel();
        config.vcpus = 0;
        assert!(matches!(config.validate(), Err(ConfigError::VcpuCount(0))));
        config.vcpus = 33;
        assert!(matches!(config.validate(), Err(ConfigError::VcpuCount(33))));
        config.vcpus = 32;
        config.memory_mib = 8;
        assert!(matches!(config.validate(), Err(ConfigError::MemorySize(8))));
    }

    #[test]
    fn rejects_missing_files() {
        let mut config = VmConfig::new("/nonexistent/vmlinux");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Missing { what: "kernel", .. })
        ));
        let (_kernel, with) = with_kernel();
        config = with;
        config.initrd = Some("/".into());
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NotAFile { what: "initrd", .. })
        ));
    }

    #[test]
    fn json_round_trip_with_defaults() {
        let config: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "console": {"file": "/tmp/c"}}"#).unwrap();
        assert_eq!(config.vcpus, DEFAULT_VCPUS);
        assert_eq!(config.console, ConsoleConfig::File("/tmp/c".into()));
        let again: VmConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "bogus": 1}"#).is_err());
    }

    #[test]
    fn disks_parse_with_an_optional_mode() {
        let disk: DiskConfig = "/img/a.ext4,ro".parse().unwrap();
        assert_eq!(
            (disk.path.to_str(), disk.read_only),
            (Some("/img/a.ext4"), true)
        );
        let disk: DiskConfig = "/img/b".parse().unwrap();
        assert!(!disk.read_only);
        assert!("/img/c,rx".parse::<DiskConfig>().is_err());
        let (_kernel, mut config) = with_kernel();
        config.disks = vec!["/nonexistent.img".parse().unwrap()];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Missing { what: "disk", .. })
        ));
    }

    #[test]
    fn vsock_parses_a_path_and_an_optional_cid() {
        let vsock: VsockConfig = "/run/v.sock".parse().unwrap();
        assert_eq!(vsock.guest_cid, DEFAULT_GUEST_CID);
        assert_eq!(vsock.uds_path, PathBuf::from("/run/v.sock"));
        let vsock: VsockConfig = "/run/v.sock,cid=42".parse().unwrap();
        assert_eq!(vsock.guest_cid, 42);
        assert!("/run/v.sock,port=1".parse::<VsockConfig>().is_err());
        assert!("/run/v.sock,cid=x".parse::<VsockConfig>().is_err());
        assert!("".parse::<VsockConfig>().is_err());
        let (_kernel, mut config) = with_kernel();
        config.vsock = Some("/run/v.sock,cid=2".parse().unwrap());
        assert!(matches!(config.validate(), Err(ConfigError::VsockCid(2))));
        config.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("x".repeat(108)),
        });
        assert!(matches!(config.validate(), Err(ConfigError::VsockPath(_))));
        let json: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "vsock": {"uds_path": "/v"}}"#).unwrap();
        assert_eq!(json.vsock.unwrap().guest_cid, 3);
    }

    #[test]
    fn console_parses_keywords_and_paths() {
        assert_eq!(
            "stdio".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdio
        );
        assert_eq!("off".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Off);
        assert_eq!(
            "/tmp/x".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/tmp/x".into())
        );
    }
}
