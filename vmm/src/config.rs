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
        if self.disks.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.disks.len()));
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
