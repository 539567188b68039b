//! CNI 1.0 client for pod networking, behaving as containerd with libcni:
//! network configuration lists are loaded from a directory ([`load_default`]),
//! plugins are run for ADD/DEL/CHECK with results chained and cached
//! ([`Cni`]), results of any version are read into one [`CniResult`], and pod
//! network namespaces are made and pinned by path ([`netns`]). For VM pods,
//! [`tap`] joins a tap device to the CNI interface inside the namespace.
//!
//! ```no_run
//! use vmrun_cni::{load_default, Attachment, Cni, NetNs, PortMapping, DEBIAN_BIN_DIR};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let network = load_default("/etc/cni/net.d".as_ref())?;
//! let cni = Cni::new(vec![DEBIAN_BIN_DIR.into()], "/var/lib/cni/results");
//! let netns = NetNs::create("/run/vmrun/netns/sandbox-1")?;
//! let mut pod = Attachment::new("sandbox-1", netns.path(), "eth0")
//!     .with_kubernetes_args("default", "web", "pod-uid");
//! pod.runtime_config.port_mappings.push(PortMapping {
//!     host_port: 8080,
//!     container_port: 80,
//!     protocol: "tcp".into(),
//!     host_ip: String::new(),
//! });
//! let result = cni.add(&network, &pod)?;
//! println!("pod IPs: {:?}", result.pod_ips());
//! // StopPodSandbox: may be repeated, also after the netns is gone.
//! cni.del(&network, &pod)?;
//! netns.remove()?;
//! # Ok(())
//! # }
//! ```

mod attachment;
mod cache;
mod client;
mod config;
mod exec;
pub mod netns;
mod plugin_error;
pub mod pod_network;
mod result;
mod runtime_config;
pub mod tap;
mod version;

pub use attachment::{format_cni_args, ArgsError, Attachment};
pub use cache::CacheError;
pub use client::{
    plugin_stdin, AddError, AttachmentError, CheckError, Cni, DelError, PluginRunError,
    DEBIAN_BIN_DIR, DEFAULT_BIN_DIR, DEFAULT_CACHE_DIR, DEFAULT_TIMEOUT,
};
pub use config::{
    config_files, load_default, FileError, LoadError, NetworkConfigList, ParseError, PluginConfig,
};
pub use exec::ExecError;
pub use netns::{NetNs, NetNsError};
pub use plugin_error::PluginError;
pub use pod_network::{detach_orphan, NetworkError, NetworkSettings, PodNetwork, NETNS_FILE};
pub use result::{Cidr, CidrError, CniResult, Dns, Interface, IpConfig, ResultError, Route};
pub use runtime_config::{Bandwidth, DnsConfig, PortMapping, RuntimeConfig};
