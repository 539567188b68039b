//! CNI 1.0 client for pod networking, behaving as containerd with libcni:
//! network configuration lists are loaded from a directory ([`load_default`]),
//! plugins are run for ADD/DEL/CHECK with results chained and cached
//! ([`Cni`]), results of any version are read into one [`CniResult`], and pod
//! network namespaces are made and pinned by path ([`netns`]). For VM pods,
//! [`tap`] joins a tap device to the CNI interface inside the namespace.

mod attachment;
mod cache;
mod client;
mod config;
mod exec;
pub mod netns;
mod plugin_error;
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
pub use result::{Cidr, CidrError, CniResult, Dns, Interface, IpConfig, ResultError, Route};
pub use runtime_config::{Bandwidth, DnsConfig, PortMapping, RuntimeConfig};
