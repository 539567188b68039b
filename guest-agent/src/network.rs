//! `ConfigureNetwork`: the pod's CNI configuration on the guest's NICs,
//! over rtnetlink (the guest has no `ip`).
//!
//! The host wires each guest NIC to the pod's interface in its network
//! namespace (tc redirects between that interface and the VMM's tap) and
//! sends what CNI put there: MAC, MTU, addresses and routes. The guest
//! takes the pod interface's MAC so that what its peers learnt (ARP,
//! bridge forwarding tables) stays true.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tonic::Status;
use vmrun_proto::v1::{ConfigureNetworkRequest, NetworkInterface, NetworkRoute};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{what}: {value:?} is not valid: {why}")]
    Invalid {
        what: String,
        value: String,
        why: String,
    },
    #[error("interface {0:?} not found in the guest")]
    NoInterface(String),
    #[error("netlink: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
}

impl From<NetworkError> for Status {
    fn from(e: NetworkError) -> Self {
        match e {
            NetworkError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            NetworkError::NoInterface(_) => Status::not_found(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

fn invalid(what: &str, value: &str, why: impl ToString) -> NetworkError {
    NetworkError::Invalid {
        what: what.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// "aa:bb:cc:dd:ee:ff" as bytes.
pub(crate) fn parse_mac(mac: &str) -> Result<Vec<u8>, NetworkError> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("mac", mac, e))?;
    if bytes.len() != 6 || mac.split(':').any(|b| b.len() != 2) {
        return Err(invalid("mac", mac, "six two-digit hex bytes are needed"));
    }
    if bytes[0] & 1 != 0 {
        return Err(invalid("mac", mac, "a multicast address"));
    }
    Ok(bytes)
}

/// "10.88.0.5/16" as address and prefix length.
pub(crate) fn parse_cidr(what: &str, cidr: &str) -> Result<(IpAddr, u8), NetworkError> {
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| invalid(what, cidr, "ADDRESS/PREFIX is needed"))?;
    let ip: IpAddr = ip.parse().map_err(|e| invalid(what, cidr, e))?;
    let len: u8 = len.parse().map_err(|e| invalid(what, cidr, e))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(invalid(what, cidr, format!("prefix longer than {max}")));
    }
    Ok((ip, len))
}

/// Checks the whole request before anything changes.
pub(crate) fn validate(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    for i in &req.interfaces {
        if i.name.is_empty() || i.name.len() > 15 || i.name.contains('/') {
            return Err(invalid("interface name", &i.name, "1 to 15 bytes, no '/'"));
        }
        if !i.mac.is_empty() {
            parse_mac(&i.mac)?;
        }
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid("mtu", &i.mtu.to_string(), "68 to 65535"));
        }
        for a in &i.addresses {
            parse_cidr("address", a)?;
        }
    }
    for r in &req.routes {
        if r.destination != "default" {
            parse_cidr("route destination", &r.destination)?;
        }
        if !r.gateway.is_empty() {
            r.gateway
                .parse::<IpAddr>()
                .map_err(|e| invalid("route gateway", &r.gateway, e))?;
        }
        if !req.interfaces.iter().any(|i| i.name == r.device) {
            return Err(invalid(
                "route device",
                &r.device,
                "not one of the request's interfaces",
            ));
        }
    }
    Ok(())
}

pub(crate) async fn configure(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    validate(req)?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    let task = tokio::spawn(connection);
    let result = apply(&handle, req).await;
    task.abort();
    result
}

async fn apply(handle: &Handle, req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let mut indexes = Vec::new();
    for i in &req.interfaces {
        indexes.push((i.name.clone(), configure_interface(handle, i).await?));
    }
    for r in &req.routes {
        let index = indexes
            .iter()
            .find(|(name, _)| *name == r.device)
            .map(|(_, index)| *index)
            .unwrap_or_default();
        add_route(handle, r, index).await?;
    }
    Ok(())
}

async fn configure_interface(handle: &Handle, i: &NetworkInterface) -> Result<u32, NetworkError> {
    let netlink = |what: String| move |source| NetworkError::Netlink { what, source };
    let link = handle
        .link()
        .get()
        .match_name(i.name.clone())
        .execute()
        .try_next()
        .await
        .map_err(|_| NetworkError::NoInterface(i.name.clone()))?
        .ok_or_else(|| NetworkError::NoInterface(i.name.clone()))?;
    let index = link.header.index;
    // The MAC changes only while the link is down.
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(netlink(format!("{} down", i.name)))?;
    let mut change = LinkUnspec::new_with_index(index);
    if !i.mac.is_empty() {
        change = change.address(parse_mac(&i.mac)?);
    }
    if i.mtu != 0 {
        change = change.mtu(i.mtu);
    }
    handle
        .link()
        .set(change.up().build())
        .execute()
        .await
        .map_err(netlink(format!("{} mac/mtu/up", i.name)))?;
    for a in &i.addresses {
        let (ip, len) = parse_cidr("address", a)?;
        handle
            .address()
            .add(index, ip, len)
            .execute()
            .await
            .map_err(netlink(format!("{} address {a}", i.name)))?;
    }
    Ok(index)
}

async fn add_route(handle: &Handle, r: &NetworkRoute, index: u32) -> Result<(), NetworkError> {
    let what = format!(
        "route {} via {:?} dev {}",
        r.destination, r.gateway, r.device
    );
    let gateway: Option<IpAddr> = r.gateway.parse().ok();
    let (dest, len) = if r.destination == "default" {
        let unspecified = match gateway {
            Some(IpAddr::V6(_)) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
        };
        (unspecified, 0)
    } else {
        parse_cidr("route destination", &r.destination)?
    };
    let mut route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, len)
        .map_err(|e| invalid("route", &what, e))?
        .output_interface(index);
    if let Some(gw) = gateway {
        route = route.gateway(gw).map_err(|e| invalid("route", &what, e))?;
    }
    handle
        .route()
        .add(route.build())
        .execute()
        .await
        .map_err(|source| NetworkError::Netlink { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mac: &str, addresses: &[&str]) -> NetworkInterface {
        NetworkInterface {
            name: "eth0".into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn requests_are_checked_whole_before_anything_changes() {
        let good = ConfigureNetworkRequest {
            interfaces: vec![iface("0a:58:0a:58:00:05", &["10.88.0.5/16", "fd00::5/64"])],
            routes: vec![NetworkRoute {
                destination: "default".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
            }],
        };
        validate(&good).unwrap();
        for (bad, named) in [
            (iface("01:00:00:00:00:01", &[]), "multicast"),
            (iface("0a:58:0a", &[]), "six"),
            (iface("", &["10.88.0.5"]), "ADDRESS/PREFIX"),
            (iface("", &["10.88.0.5/33"]), "prefix longer"),
        ] {
            let req = ConfigureNetworkRequest {
                interfaces: vec![bad],
                routes: vec![],
            };
            let err = validate(&req).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        let mut stray = good.clone();
        stray.routes[0].device = "eth1".into();
        let err = validate(&stray).unwrap_err().to_string();
        assert!(err.contains("not one of the request's interfaces"), "{err}");
    }
}
