//! The `[cri]` section of `/etc/vmrun/config.toml`:
//!
//! ```toml
//! [cri]
//! socket = "/run/vmrun/vmrun.sock"   # the CRI endpoint kubelet and crictl use
//! stream_address = "127.0.0.1"       # exec/attach/port-forward URLs are served here
//! stream_port = 0                    # 0: any free port
//! cni_conf_dir = "/etc/cni/net.d"
//! cni_bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
//! [cri.runtimes.native]              # RuntimeClass handler name -> runtime
//! runtime = "native"
//! [cri.runtimes.vm]
//! runtime = "vm"
//! ```
//!
//! Without a `runtimes` table the handlers are `""` (the default), `runc`
//! and `native` for native, `vm` for vm and `wasm` for wasm, as containerd's
//! `[plugins.cri.containerd.runtimes]` maps handlers to runtimes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/vmrun/vmrun.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriConfig {
    pub socket: PathBuf,
    pub stream_address: IpAddr,
    pub stream_port: u16,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub runtimes: BTreeMap<String, HandlerConfig>,
}

/// One RuntimeClass handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    pub runtime: RuntimeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Native,
    Vm,
    Wasm,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Native => "native",
            RuntimeKind::Vm => "vm",
            RuntimeKind::Wasm => "wasm",
        }
    }
}

impl Default for CriConfig {
    fn default() -> Self {
        let handlers = [
            ("", RuntimeKind::Native),
            ("runc", RuntimeKind::Native),
            ("native", RuntimeKind::Native),
            ("vm", RuntimeKind::Vm),
            ("wasm", RuntimeKind::Wasm),
        ];
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            stream_address: IpAddr::from([127, 0, 0, 1]),
            stream_port: 0,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            runtimes: handlers
                .into_iter()
                .map(|(name, runtime)| (name.to_string(), HandlerConfig { runtime }))
                .collect(),
        }
    }
}

impl CriConfig {
    /// The runtime of a RuntimeClass handler, or an error naming the ones there are.
    pub fn runtime_for(&self, handler: &str) -> Result<RuntimeKind, String> {
        match self.runtimes.get(handler) {
            Some(h) => Ok(h.runtime),
            None => Err(format!(
                "no runtime for handler {handler:?} is configured (configured: {})",
                self.runtimes
                    .keys()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_default_like_containerd_and_unknown_ones_are_named() {
        let c = CriConfig::default();
        assert_eq!(c.runtime_for("").unwrap(), RuntimeKind::Native);
        assert_eq!(c.runtime_for("runc").unwrap(), RuntimeKind::Native);
        assert_eq!(c.runtime_for("vm").unwrap(), RuntimeKind::Vm);
        let e = c.runtime_for("kata").unwrap_err();
        assert!(e.contains("\"kata\"") && e.contains("\"vm\""), "{e}");
    }

    #[test]
    fn the_config_section_parses_from_toml() {
        let c: CriConfig = serde_json::from_value(serde_json::json!({
            "socket": "/tmp/x.sock",
            "runtimes": { "fast": { "runtime": "native" } }
        }))
        .unwrap();
        assert_eq!(c.runtime_for("fast").unwrap(), RuntimeKind::Native);
        assert!(
            c.runtime_for("").is_err(),
            "a runtimes table replaces the defaults"
        );
    }
}
