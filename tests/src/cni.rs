//! CNI networks of the tests' own.

use std::path::Path;
use std::time::{Duration, Instant};

/// A bridge network of this test's own (bridge, subnet and IPAM data), as a
/// node's `/etc/cni/net.d` would hold it, with the portmap plugin (for
/// hostPorts); None when the plugins are missing.
pub fn test_network(bridge: &str, subnet: &str, ipam_dir: &Path) -> Option<String> {
    plugins_installed().then(|| bridge_network(bridge, subnet, ipam_dir, true))
}

/// Whether Debian's containernetworking-plugins are installed.
pub fn plugins_installed() -> bool {
    Path::new("/usr/lib/cni/bridge").exists()
}

/// [`test_network`]'s configuration, with or without the portmap plugin.
pub fn bridge_network(bridge: &str, subnet: &str, ipam_dir: &Path, portmap: bool) -> String {
    let portmap = if portmap {
        r#"{"type": "portmap", "capabilities": {"portMappings": true}},"#
    } else {
        ""
    };
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{bridge}",
  "plugins": [
    {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]],
               "dataDir": {ipam:?}}}}},
    {portmap}
    {{"type": "loopback"}}
  ]
}}"#,
        ipam = ipam_dir.display().to_string()
    )
}

/// Connects to `addr` until a connection answers exactly `want` (a server
/// that writes one line and closes) or `timeout` passes, which panics
/// naming the last answer. A server may take a while to listen.
pub fn wait_for_line(addr: &str, want: &str, timeout: Duration) {
    let sock: std::net::SocketAddr = addr.parse().expect("address");
    let deadline = Instant::now() + timeout;
    loop {
        let got = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).and_then(
            |mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                std::io::Read::read_to_string(&mut s, &mut line)?;
                Ok(line)
            },
        );
        if matches!(&got, Ok(line) if line == want) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}: {got:?}, not {want:?}");
        // Each try waits for the server's answer; this only spaces refusals.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// host-local (data in `ipam_dir`) holds no lease of network `network` in
/// the subnet whose addresses start with `prefix`: DEL released them all.
pub fn assert_no_leases(ipam_dir: &Path, network: &str, prefix: &str) {
    let leases: Vec<_> = std::fs::read_dir(ipam_dir.join(network))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !leases.iter().any(|l| l.starts_with(prefix)),
        "host-local leases left: {leases:?}"
    );
}
