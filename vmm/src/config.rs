//! The VM's configuration: what the command line (or a JSON file) asks for,
//! validated before any hypervisor resource is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::mptable::MAX_CPUS;
use crate::devices::virtio::net::mac::MacAddr;
use crate::devices::virtio::net::tap::valid_interface_name;
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

/// A virtio-net device on a tap device: named (created or attached by the
/// VMM, which needs CAP_NET_ADMIN to create one) or inherited as an open
/// file descriptor. Exactly one of `tap` and `fd`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub fd: Option<i32>,
    /// The guest's MAC; by default a locally administered one derived from
    /// the tap's name.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `TAPNAME`, `tap=TAPNAME` or `fd=N`, then optionally `,mac=MAC`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut config = NetConfig {
            tap: None,
            fd: None,
            mac: None,
        };
        for (index, option) in s.split(',').enumerate() {
            match option.split_once('=') {
                Some(("tap", name)) => config.tap = Some(name.to_owned()),
                Some(("fd", fd)) => {
                    config.fd = Some(
                        fd.parse()
                            .map_err(|_| format!("invalid net fd {fd:?}: a number is needed"))?,
                    )
                }
                Some(("mac", mac)) => config.mac = Some(mac.parse().map_err(|e| format!("{e}"))?),
                None if index == 0 => config.tap = Some(option.to_owned()),
                _ => {
                    return Err(format!(
                        "unknown net option {option:?} (TAPNAME, tap=NAME, fd=N, mac=MAC)"
                    ))
                }
            }
        }
        Ok(config)
    }
}

impl NetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.tap, self.fd) {
            (None, None) => return Err(ConfigError::NetBackendMissing),
            (Some(tap), Some(fd)) => {
                return Err(ConfigError::NetBackendTwice {
                    tap: tap.clone(),
                    fd,
                })
            }
            (Some(tap), None) if !valid_interface_name(tap) => {
                return Err(ConfigError::NetTapName(tap.clone()))
            }
            (None, Some(fd)) if fd < 0 => return Err(ConfigError::NetFd(fd)),
            _ => {}
        }
        if let Some(mac) = self.mac {
            mac.check_unicast()
                .map_err(|e| ConfigError::NetMac(e.to_string()))?;
        }
        Ok(())
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
    /// Back guest memory with transparent huge pages (faster guest, but a
    /// touched 4 KiB page costs 2 MiB of host memory). Off by default,
    /// whatever the host's THP setting.
    #[serde(default)]
    pub huge_pages: bool,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Empty disk slots after `disks`, filled through the control API's
    /// `attach_disk` while the guest runs (capacity 0 until then).
    #[serde(default)]
    pub spare_disks: u8,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices, in the order the guest sees them (eth0, ...).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// The control socket (line-delimited JSON), if any.
    #[serde(default)]
    pub api: Option<PathBuf>,
    /// A virtio-balloon device, if any.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
}

/// The virtio-balloon device. Its target stays 0 (the host never asks for
/// memory back); with `free_page_reporting` the guest returns memory it
/// freed, which keeps an idle VM's host footprint small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    #[serde(default)]
    pub free_page_reporting: bool,
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
            huge_pages: false,
            console: ConsoleConfig::default(),
            disks: Vec::new(),
            spare_disks: 0,
            vsock: None,
            nets: Vec::new(),
            api: None,
            balloon: None,
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
        let devices = self.disks.len()
            + usize::from(self.spare_disks)
            + usize::from(self.vsock.is_some())
            + self.nets.len()
            + usize::from(self.balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        for (index, net) in self.nets.iter().enumerate() {
            net.validate()?;
            let earlier = &self.nets[..index];
            if let Some(tap) = &net.tap {
                if earlier.iter().any(|n| n.tap.as_ref() == Some(tap)) {
                    return Err(ConfigError::NetDuplicate(format!("tap {tap}")));
                }
            }
            if let Some(mac) = net.mac {
                if earlier.iter().any(|n| n.mac == Some(mac)) {
                    return Err(ConfigError::NetDuplicate(format!("MAC {mac}")));
                }
            }
        }
        if self.spare_disks > 0 && self.api.is_none() {
            return Err(ConfigError::SpareDisksWithoutApi);
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
    #[error("spare disk slots are filled through the control API: give --api too")]
    SpareDisksWithoutApi,
    #[error("console file path is empty")]
    EmptyConsolePath,
    #[error("vsock guest cid must be between 3 and 4294967294, not {0}")]
    VsockCid(u64),
    #[error("vsock socket path {0:?} must be 1 to 107 bytes long")]
    VsockPath(PathBuf),
    #[error("control socket path {0:?} must be 1 to 107 bytes long")]
    ApiPath(PathBuf),
    #[error("a net device needs a tap name or a tap fd (`--net TAPNAME`, `--net fd=N`)")]
    NetBackendMissing,
    #[error("a net device has both tap {tap:?} and fd {fd}; give one")]
    NetBackendTwice { tap: String, fd: i32 },
    #[error("invalid tap device name {0:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    NetTapName(String),
    #[error("invalid tap file descriptor {0}")]
    NetFd(i32),
    #[error("{0}")]
    NetMac(String),
    #[error("two net devices have the same {0}")]
    NetDuplicate(String),
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
    fn nets_parse_a_tap_or_an_fd_and_an_optional_mac() {
        let net: NetConfig = "vmtap0".parse().unwrap();
        assert_eq!(net.tap.as_deref(), Some("vmtap0"));
        assert_eq!((net.fd, net.mac), (None, None));
        let net: NetConfig = "tap=t1,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(net.tap.as_deref(), Some("t1"));
        assert_eq!(net.mac.unwrap().to_string(), "52:54:00:00:00:01");
        let net: NetConfig = "fd=7".parse().unwrap();
        assert_eq!((net.tap, net.fd), (None, Some(7)));
        let error = "t0,mac=52:54:00:00:00".parse::<NetConfig>().unwrap_err();
        assert!(error.contains("invalid MAC address"), "{error}");
        assert!("t0,mac=01:00:5e:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("fd=x".parse::<NetConfig>().is_err());
        assert!("t0,speed=10".parse::<NetConfig>().is_err());
    }

    #[test]
    fn nets_need_exactly_one_valid_backend() {
        let (_kernel, mut config) = with_kernel();
        let net = |tap: Option<&str>, fd: Option<i32>| NetConfig {
            tap: tap.map(str::to_owned),
            fd,
            mac: None,
        };
        config.nets = vec![net(Some("vmtap0"), None), net(None, Some(3))];
        config.validate().unwrap();
        config.nets = vec![net(None, None)];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NetBackendMissing)
        ));
        config.nets = vec![net(Some("t"), Some(3))];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NetBackendTwice { .. })
        ));
        config.nets = vec![net(Some("a/b"), None)];
        assert!(matches!(config.validate(), Err(ConfigError::NetTapName(_))));
        config.nets = vec![net(Some(&"x".repeat(16)), None)];
        assert!(matches!(config.validate(), Err(ConfigError::NetTapName(_))));
        config.nets = vec![net(None, Some(-1))];
        assert!(matches!(config.validate(), Err(ConfigError::NetFd(-1))));
        config.nets = vec![net(Some("t"), None), net(Some("t"), None)];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NetDuplicate(_))
        ));
        let mut multicast = net(Some("t"), None);
        multicast.mac = Some(MacAddr([1, 0, 0, 0, 0, 1]));
        config.nets = vec![multicast];
        assert!(matches!(config.validate(), Err(ConfigError::NetMac(_))));
        config.nets = vec![net(Some("t"), None); MAX_VIRTIO_DEVICES + 1];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::TooManyDevices(_))
        ));
    }

    #[test]
    fn nets_in_json() {
        let config: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "nets": [
                {"tap": "vmtap0", "fd": null, "mac": "52:54:00:aa:bb:cc"},
                {"fd": 4}
            ]}"#,
        )
        .unwrap();
        assert_eq!(config.nets.len(), 2);
        assert_eq!(config.nets[0].mac.unwrap().0[5], 0xcc);
        assert_eq!(config.nets[1].fd, Some(4));
        let again: VmConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        let error = serde_json::from_str::<VmConfig>(
            r#"{"kernel": "/k", "nets": [{"tap": "t", "mac": "nope"}]}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("invalid MAC address"), "{error}");
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"kernel": "/k", "nets": [{"tap": "t", "speed": 1}]}"#
        )
        .is_err());
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
