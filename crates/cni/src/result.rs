//! Plugin results: CNI 1.0.0, and the older 0.3.x/0.4.0 (`ips[].version`)
//! and 0.1.0/0.2.0 (`ip4`/`ip6`) formats, read into one shape.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde_json::Value;

/// Why a plugin's result could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("result is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("result is not a JSON object")]
    NotAnObject,
    #[error("result field `{field}` is malformed: {reason}")]
    Field { field: String, reason: String },
}

fn field_error(field: impl Into<String>, reason: impl Into<String>) -> ResultError {
    ResultError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// An address with its prefix length, e.g. `10.250.37.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Why a CIDR string could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an address/prefix-length")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(text.to_string());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An interface a plugin created or configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// The netns path when the interface is inside the sandbox; `None` on the host.
    pub sandbox: Option<String>,
}

/// One assigned address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    pub interface: Option<usize>,
}

/// One route to set up in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    pub gw: Option<IpAddr>,
}

/// Resolver settings a plugin reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// A result in the one shape the runtime uses, whatever version produced it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// The version the plugin wrote.
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
    /// The JSON as the plugin printed it: chained on as `prevResult` and cached.
    pub raw: Value,
}

impl CniResult {
    /// Reads a result of any supported version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ResultError> {
        Self::from_value(serde_json::from_slice(bytes)?)
    }

    /// Reads a result already parsed as JSON.
    pub fn from_value(raw: Value) -> Result<Self, ResultError> {
        let top = raw.as_object().ok_or(ResultError::NotAnObject)?;
        let cni_version = top
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut result = if top.contains_key("ip4") || top.contains_key("ip6") {
            parse_legacy(top)?
        } else {
            CniResult {
                interfaces: parse_interfaces(top.get("interfaces"))?,
                ips: parse_ips(top.get("ips"))?,
                routes: parse_routes("routes", top.get("routes"))?,
                ..CniResult::default()
            }
        };
        result.dns = parse_dns(top.get("dns"))?;
        result.cni_version = cni_version;
        result.raw = raw;
        Ok(result)
    }

    /// The pod's addresses for CRI's PodSandboxStatus: those on interfaces
    /// inside the sandbox, IPv4 first, each once. Results that name no
    /// interfaces at all (legacy formats) give all their addresses.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let in_sandbox = |ip: &IpConfig| {
            if self.interfaces.is_empty() {
                return true;
            }
            ip.interface
                .and_then(|index| self.interfaces.get(index))
                .is_some_and(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in self.ips.iter().filter(|ip| in_sandbox(ip)) {
            if !ips.contains(&ip.address.addr) {
                ips.push(ip.address.addr);
            }
        }
        // Stable: keeps the plugin's order within each family.
        ips.sort_by_key(|ip| !ip.is_ipv4());
        ips
    }

    /// The first sandbox interface, usually `eth0`, e.g. for its MAC.
    pub fn sandbox_interface(&self) -> Option<&Interface> {
        self.interfaces
            .iter()
            .find(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
    }
}

fn as_array<'a>(field: &str, value: Option<&'a Value>) -> Result<&'a [Value], ResultError> {
    match value {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(field_error(field, "not an array")),
    }
}

fn opt_str<'a>(field: &str, value: Option<&'a Value>) -> Result<Option<&'a str>, ResultError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(field_error(field, "not a string")),
    }
}

fn string_list(field: &str, value: Option<&Value>) -> Result<Vec<String>, ResultError> {
    as_array(field, value)?
        .iter()
        .map(|item| {
            item.as_str()
                .map(str::to_string)
                .ok_or_else(|| field_error(field, "has a non-string entry"))
        })
        .collect()
}

fn opt_ip(field: &str, value: Option<&Value>) -> Result<Option<IpAddr>, ResultError> {
    match opt_str(field, value)? {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| field_error(field, format!("{text:?} is not an IP address"))),
    }
}

fn cidr(field: &str, value: Option<&Value>) -> Result<Cidr, ResultError> {
    let text = opt_str(field, value)?.ok_or_else(|| field_error(field, "missing"))?;
    text.parse()
        .map_err(|error: CidrError| field_error(field, error.to_string()))
}

fn parse_interfaces(value: Option<&Value>) -> Result<Vec<Interface>, ResultError> {
    as_array("interfaces", value)?
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let field = format!("interfaces[{index}]");
            let name = opt_str(&format!("{field}.name"), item.get("name"))?
                .ok_or_else(|| field_error(&field, "has no name"))?;
            let mtu = match item.get("mtu") {
                None | Some(Value::Null) => None,
                Some(mtu) => Some(
                    mtu.as_u64()
                        .and_then(|mtu| u32::try_from(mtu).ok())
                        .ok_or_else(|| field_error(format!("{field}.mtu"), "not a number"))?,
                ),
            };
            Ok(Interface {
                name: name.to_string(),
                mac: opt_str(&format!("{field}.mac"), item.get("mac"))?.map(str::to_string),
                mtu,
                sandbox: opt_str(&format!("{field}.sandbox"), item.get("sandbox"))?
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            })
        })
        .collect()
}

fn parse_ips(value: Option<&Value>) -> Result<Vec<IpConfig>, ResultError> {
    as_array("ips", value)?
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let field = format!("ips[{index}]");
            // 0.3.x/0.4.0 also have `version`: "4"/"6", which the address
            // itself tells; only a contradiction is an error.
            let address = cidr(&format!("{field}.address"), item.get("address"))?;
            if let Some(version) = opt_str(&format!("{field}.version"), item.get("version"))? {
                let expected = if address.addr.is_ipv4() { "4" } else { "6" };
                if version != expected {
                    return Err(field_error(
                        format!("{field}.version"),
                        format!("{version:?} does not match address {address}"),
                    ));
                }
            }
            let interface = match item.get("interface") {
                None | Some(Value::Null) => None,
                Some(index) => Some(
                    index
                        .as_u64()
                        .and_then(|index| usize::try_from(index).ok())
                        .ok_or_else(|| field_error(format!("{field}.interface"), "not an index"))?,
                ),
            };
            Ok(IpConfig {
                address,
                gateway: opt_ip(&format!("{field}.gateway"), item.get("gateway"))?,
                interface,
            })
        })
        .collect()
}

fn parse_routes(field: &str, value: Option<&Value>) -> Result<Vec<Route>, ResultError> {
    as_array(field, value)?
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let field = format!("{field}[{index}]");
            Ok(Route {
                dst: cidr(&format!("{field}.dst"), item.get("dst"))?,
                gw: opt_ip(&format!("{field}.gw"), item.get("gw"))?,
            })
        })
        .collect()
}

fn parse_dns(value: Option<&Value>) -> Result<Dns, ResultError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Dns::default());
    };
    if !value.is_object() {
        return Err(field_error("dns", "not an object"));
    }
    Ok(Dns {
        nameservers: string_list("dns.nameservers", value.get("nameservers"))?,
        domain: opt_str("dns.domain", value.get("domain"))?.map(str::to_string),
        search: string_list("dns.search", value.get("search"))?,
        options: string_list("dns.options", value.get("options"))?,
    })
}

/// 0.1.0/0.2.0: `ip4`/`ip6` objects with `ip`, `gateway` and `routes`, and no
/// interfaces.
fn parse_legacy(top: &serde_json::Map<String, Value>) -> Result<CniResult, ResultError> {
    let mut result = CniResult::default();
    for key in ["ip4", "ip6"] {
        let Some(block) = top.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        result.ips.push(IpConfig {
            address: cidr(&format!("{key}.ip"), block.get("ip"))?,
            gateway: opt_ip(&format!("{key}.gateway"), block.get("gateway"))?,
            interface: None,
        });
        result
            .routes
            .extend(parse_routes(&format!("{key}.routes"), block.get("routes"))?);
    }
    Ok(result)
}
