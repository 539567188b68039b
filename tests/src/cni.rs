//! CNI networks of the tests' own.

use std::path::Path;

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
