//! A VM pod's NIC: a tap device inside the pod's network namespace, joined
//! to the CNI interface (eth0) by tc redirects both ways, as Kata
//! Containers' `tcfilter` model does. The guest then takes eth0's MAC and
//! addresses, and the CNI plugins never learn there is a VM.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::netns::{self, NetNsError};
use crate::result::Cidr;

/// Why the tap could not be made or joined to the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap device name {0:?} is not usable (1-15 bytes, no '/', ':' or whitespace)")]
    Name(String),
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("cannot open /dev/net/tun in network namespace {netns}: {source}")]
    OpenTun { netns: PathBuf, source: io::Error },
    #[error("cannot create tap device {name} in network namespace {netns}: {source}")]
    Create {
        name: String,
        netns: PathBuf,
        source: io::Error,
    },
    #[error("cannot run `{command}` in network namespace {netns}: {source}")]
    Spawn {
        command: String,
        netns: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` failed in network namespace {netns}: {stderr}")]
    Command {
        command: String,
        netns: PathBuf,
        stderr: String,
    },
    #[error("interface {ifname} in network namespace {netns}: {reason}")]
    Interface {
        ifname: String,
        netns: PathBuf,
        reason: String,
    },
}

/// An open tap device. It exists as long as `file` (or any fd of it) is open,
/// unless it was made persistent; hand `file` to the VMM.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub file: File,
}

/// What the guest's NIC must look like so traffic fits the CNI setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
}

/// A tap joined to a CNI interface, with what the guest should take over.
#[derive(Debug)]
pub struct VmNic {
    pub tap: Tap,
    /// The CNI interface's MAC, MTU and addresses.
    pub link: LinkInfo,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

/// Creates tap `name` in the namespace at `netns` with `IFF_TAP | IFF_NO_PI
/// | IFF_VNET_HDR` (the virtio-net header lets the VMM pass offloads).
/// `persistent` keeps the device after the fd closes, for a VMM that opens
/// it by name from inside the namespace.
pub fn create_tap(netns: &Path, name: &str, persistent: bool) -> Result<Tap, TapError> {
    if !valid_name(name) {
        return Err(TapError::Name(name.to_string()));
    }
    // TUNSETIFF makes the device in the namespace of the calling thread.
    netns::run_in(netns, || open_tap(netns, name, persistent))?
}

fn open_tap(netns: &Path, name: &str, persistent: bool) -> Result<Tap, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| TapError::OpenTun {
            netns: netns.to_path_buf(),
            source,
        })?;
    let create_error = |source| TapError::Create {
        name: name.to_string(),
        netns: netns.to_path_buf(),
        source,
    };
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers), for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // valid_name kept the name to 15 bytes, so the terminating NUL of the
    // zeroed 16-byte array stays.
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    // The flags fit a short: they are all below 0x8000.
    request.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, and `request` is
    // a live, correctly sized ifreq owned by this frame; the fd is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(create_error(io::Error::last_os_error()));
    }
    if persistent {
        // SAFETY: TUNSETPERSIST takes its argument by value (an int flag),
        // not as a pointer; the fd is an attached tap.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(create_error(io::Error::last_os_error()));
        }
    }
    Ok(Tap {
        name: name.to_string(),
        file,
    })
}

/// Runs a Debian `ip`/`tc` command inside the namespace; its stdout.
fn run_in_netns(netns: &Path, program: &str, args: &[&str]) -> Result<String, TapError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .map_err(|source| TapError::Spawn {
            command: command.clone(),
            netns: netns.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(TapError::Command {
            command,
            netns: netns.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// MAC, MTU and addresses of `ifname` in the namespace at `netns`.
pub fn link_info(netns: &Path, ifname: &str) -> Result<LinkInfo, TapError> {
    let json = run_in_netns(netns, "ip", &["-j", "addr", "show", "dev", ifname])?;
    let bad = |reason: String| TapError::Interface {
        ifname: ifname.to_string(),
        netns: netns.to_path_buf(),
        reason,
    };
    let value: Value = serde_json::from_str(&json)
        .map_err(|error| bad(format!("unreadable `ip -j addr` output: {error}")))?;
    let link = value
        .as_array()
        .and_then(|links| links.first())
        .ok_or_else(|| bad("not found".into()))?;
    let mac = link
        .get("address")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("has no MAC address".into()))?
        .to_string();
    let mtu = link
        .get("mtu")
        .and_then(Value::as_u64)
        .and_then(|mtu| u32::try_from(mtu).ok())
        .ok_or_else(|| bad("has no MTU".into()))?;
    let mut addresses = Vec::new();
    for info in link
        .get("addr_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(local), Some(prefix)) = (
            info.get("local").and_then(Value::as_str),
            info.get("prefixlen").and_then(Value::as_u64),
        ) else {
            continue;
        };
        // The guest makes its own link-local address.
        if info.get("scope").and_then(Value::as_str) == Some("link") {
            continue;
        }
        let cidr: Cidr = format!("{local}/{prefix}")
            .parse()
            .map_err(|error| bad(format!("address: {error}")))?;
        addresses.push(cidr);
    }
    Ok(LinkInfo {
        mac,
        mtu,
        addresses,
    })
}

/// Redirects every frame arriving on `from` out of `to`, with an ingress
/// qdisc and a match-everything filter (what Kata's tcfilter model
/// installs). `matchall` is the plain classifier; kernels built without
/// cls_matchall get the equivalent `u32 match u32 0 0` that Kata used first.
fn redirect(netns: &Path, from: &str, to: &str) -> Result<(), TapError> {
    run_in_netns(netns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
    let filter = |classifier: &[&str]| {
        let mut args = vec![
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all",
        ];
        args.extend_from_slice(classifier);
        args.extend_from_slice(&["action", "mirred", "egress", "redirect", "dev", to]);
        run_in_netns(netns, "tc", &args)
    };
    filter(&["matchall"])
        .or_else(|_| filter(&["u32", "match", "u32", "0", "0"]))
        .map(drop)
}

/// Joins tap `tap` to `ifname` both ways: the tap takes the interface's MTU
/// and comes up, and each one's ingress is sent out of the other.
pub fn join_tap(netns: &Path, ifname: &str, tap: &str, mtu: u32) -> Result<(), TapError> {
    let mtu = mtu.to_string();
    run_in_netns(netns, "ip", &["link", "set", "dev", tap, "mtu", &mtu, "up"])?;
    redirect(netns, ifname, tap)?;
    redirect(netns, tap, ifname)
}

/// Removes the redirects again (the tap itself goes with its last fd, or
/// with the namespace). Missing qdiscs are fine: teardown can be repeated.
pub fn unjoin_tap(netns: &Path, ifname: &str, tap: &str) {
    for dev in [ifname, tap] {
        let _ = run_in_netns(netns, "tc", &["qdisc", "del", "dev", dev, "ingress"]);
    }
}

/// The whole VM NIC setup for a pod whose CNI ADD is done: tap `tap_name`
/// in the namespace, joined to `ifname`, with `ifname`'s MAC, MTU and
/// addresses for the guest. Undoes what it made when a step fails.
pub fn attach_vm_nic(netns: &Path, ifname: &str, tap_name: &str) -> Result<VmNic, TapError> {
    let link = link_info(netns, ifname)?;
    let tap = create_tap(netns, tap_name, false)?;
    if let Err(error) = join_tap(netns, ifname, tap_name, link.mtu) {
        unjoin_tap(netns, ifname, tap_name);
        return Err(error);
    }
    Ok(VmNic { tap, link })
}
