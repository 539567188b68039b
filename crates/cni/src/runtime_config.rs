//! Per-attachment settings passed to plugins as `runtimeConfig`, each under
//! the capability name a plugin must declare to receive it (CNI CONVENTIONS).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::PluginConfig;

/// One `portMappings` entry, as the portmap plugin reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Empty for all host addresses.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The `dns` capability: the pod's resolver settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searches: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The `bandwidth` capability, in bits per second and bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// Everything the runtime can offer plugins; an empty field is offered to no
/// plugin, as containerd does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub port_mappings: Vec<PortMapping>,
    pub dns: Option<DnsConfig>,
    pub bandwidth: Option<Bandwidth>,
    /// Other capabilities by name (e.g. `ips`, `mac`, `cgroupPath`).
    pub extra: BTreeMap<String, Value>,
}

impl RuntimeConfig {
    /// Every offered capability with its value.
    pub fn capability_values(&self) -> BTreeMap<String, Value> {
        let mut values = self.extra.clone();
        if !self.port_mappings.is_empty() {
            values.insert("portMappings".into(), to_value(&self.port_mappings));
        }
        if let Some(dns) = &self.dns {
            values.insert("dns".into(), to_value(dns));
        }
        if let Some(bandwidth) = &self.bandwidth {
            values.insert("bandwidth".into(), to_value(bandwidth));
        }
        values
    }

    /// The `runtimeConfig` object for `plugin`: only the capabilities it
    /// declares, so a plugin never sees settings it did not ask for. `None`
    /// when there is nothing to give it.
    pub fn for_plugin(&self, plugin: &PluginConfig) -> Option<serde_json::Map<String, Value>> {
        let selected: serde_json::Map<String, Value> = self
            .capability_values()
            .into_iter()
            .filter(|(name, _)| plugin.has_capability(name))
            .collect();
        (!selected.is_empty()).then_some(selected)
    }
}

fn to_value<T: Serialize>(value: &T) -> Value {
    // These types are plain structs of strings and numbers, which always
    // serialise; Null would only hide a programming error, not bad input.
    serde_json::to_value(value).unwrap_or(Value::Null)
}
