//! A VM NIC: a tap in the pod namespace joined to its eth0 by tc redirects.
//! eth0's peer sits in a second namespace of this test; all frames stay
//! between these two namespaces (10.250.38.0/24).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;
use vmrun_cni::{netns, tap, NetNs};

/// The default virtio-net header before each frame with IFF_VNET_HDR.
const VNET_HDR: usize = 10;

fn ip(netns: &Path, args: &[&str]) -> String {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn rx_packets(netns: &Path, dev: &str) -> u64 {
    let json: Value = serde_json::from_str(&ip(netns, &["-j", "-s", "link", "show", "dev", dev]))
        .expect("ip json");
    json[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

struct Cleanup(Vec<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(error) = netns::remove(path) {
                eprintln!("cleanup: {error}");
            }
        }
    }
}

#[test]
fn frames_cross_between_eth0_and_the_tap_both_ways() {
    if !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED frames_cross_between_eth0_and_the_tap_both_ways: no /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pod = dir.path().join("pod");
    let out = dir.path().join("out");
    let _cleanup = Cleanup(vec![pod.clone(), out.clone()]);
    NetNs::create(&pod).expect("pod netns");
    NetNs::create(&out).expect("outer netns");
    let out_arg = out.display().to_string();
    ip(
        &pod,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    );
    ip(&pod, &["link", "set", "peer0", "netns", &out_arg]);
    ip(&pod, &["addr", "add", "10.250.38.2/24", "dev", "eth0"]);
    ip(&pod, &["link", "set", "eth0", "up"]);
    ip(&out, &["addr", "add", "10.250.38.1/24", "dev", "peer0"]);
    ip(&out, &["link", "set", "peer0", "up"]);

    let mut nic = tap::attach_vm_nic(&pod, "eth0", "tap0").expect("attach tap");
    assert_eq!(nic.tap.name, "tap0");
    assert_eq!(nic.link.mtu, 1500);
    assert_eq!(
        nic.link.addresses,
        vec!["10.250.38.2/24".parse().expect("cidr")]
    );
    let eth0: Value =
        serde_json::from_str(&ip(&pod, &["-j", "link", "show", "dev", "eth0"])).expect("json");
    assert_eq!(eth0[0]["address"].as_str(), Some(nic.link.mac.as_str()));

    // Outer -> eth0 -> tap: the ARP request for the pod IP reaches the tap.
    netns::run_in(&out, || {
        let socket = std::net::UdpSocket::bind("10.250.38.1:0")?;
        socket.send_to(b"hello", "10.250.38.2:9")
    })
    .expect("enter outer netns")
    .expect("send from outer netns");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_arp = false;
    let mut frame = vec![0u8; 65536];
    while !saw_arp && Instant::now() < deadline {
        let mut fds = [PollFd::new(nic.tap.file.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(500u16)).expect("poll tap") == 0 {
            continue;
        }
        let len = nic.tap.file.read(&mut frame).expect("read tap");
        let eth = &frame[VNET_HDR.min(len)..len];
        // ARP (0x0806) asking for 10.250.38.2 (target IP at 24..28).
        saw_arp = eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[38..42] == [10, 250, 38, 2];
    }
    assert!(saw_arp, "no ARP request for the pod IP came out of the tap");

    // Tap -> eth0 -> outer: a frame the guest sends arrives on the peer.
    let before = rx_packets(&out, "peer0");
    let mut guest_frame = vec![0u8; VNET_HDR];
    guest_frame.extend_from_slice(&[0xff; 6]);
    guest_frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    // The IEEE "local experimental" ethertype: nothing will act on it.
    guest_frame.extend_from_slice(&[0x88, 0xb5]);
    guest_frame.extend_from_slice(&[0u8; 46]);
    nic.tap.file.write_all(&guest_frame).expect("write tap");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx_packets(&out, "peer0") <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rx_packets(&out, "peer0") > before,
        "the guest frame did not reach the peer"
    );

    tap::unjoin_tap(&pod, "eth0", "tap0");
    tap::unjoin_tap(&pod, "eth0", "tap0");
}

#[test]
fn bad_tap_names_are_refused() {
    for name in ["", "a-name-longer-than-15", "a/b", "a b"] {
        let error = tap::create_tap(Path::new("/proc/self/ns/net"), name, false).expect_err(name);
        assert!(matches!(error, tap::TapError::Name(_)), "{name}: {error}");
    }
}
