//! `vmrun run`'s pod network: with a CNI network configured, the pod joins
//! it the way a CRI pod does (`vmrun_cni::pod_network`: the namespace of the
//! sandbox's network holder pinned in the pod's directory, ADD, and DEL at
//! the end); without one, or with hostNetwork, it keeps loopback only.

use std::path::Path;
use std::sync::Arc;

use vmrun_cni::pod_network::POD_INTERFACE;
use vmrun_cni::{Attachment, NetworkSettings, PodNetwork, PortMapping};

use crate::plan::{HostPort, PodPlan};
use crate::runtime::Sandbox;

/// What CNI is told of the pod: its container id is the pod's uid, its
/// Kubernetes names as CNI_ARGS (as kubelet's pods carry them) and its
/// host ports for the portmap plugin. The portmap plugin's DEL finds its
/// rules by the container id, so an orphan's DEL may pass none.
pub fn attachment(
    uid: &str,
    namespace: &str,
    name: &str,
    netns: &Path,
    host_ports: &[HostPort],
) -> Attachment {
    let mut a =
        Attachment::new(uid, netns, POD_INTERFACE).with_kubernetes_args(namespace, name, uid);
    a.runtime_config.port_mappings = host_ports
        .iter()
        .map(|p| PortMapping {
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: p.protocol.clone(),
            host_ip: p.host_ip.clone(),
        })
        .collect();
    a
}

/// Attaches the sandbox's network namespace; a pod VM then joins its guest
/// to the interface CNI made. None when the pod has no namespace of its own
/// to attach (hostNetwork). On failure nothing stays attached.
pub async fn join(
    settings: &NetworkSettings,
    plan: &Arc<PodPlan>,
    dir: &Path,
    sandbox: &Arc<dyn Sandbox>,
) -> Result<Option<PodNetwork>, String> {
    let Some(holder) = sandbox.network_holder_pid().filter(|_| !plan.host_network) else {
        return Ok(None);
    };
    let (settings, plan, dir, sandbox) = (
        settings.clone(),
        plan.clone(),
        dir.to_path_buf(),
        sandbox.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let network = PodNetwork::attach(&settings, &dir, holder, |netns| {
            attachment(
                &plan.uid,
                &plan.namespace,
                &plan.name,
                netns,
                &plan.host_ports,
            )
        })
        .map_err(|e| e.to_string())?;
        if let Err(e) = sandbox.network_attached(network.netns_path()) {
            let _ = network.detach();
            return Err(format!("pod network: {e}"));
        }
        Ok(Some(network))
    })
    .await
    .map_err(|e| format!("pod network setup panicked: {e}"))?
}

/// CNI DEL and the namespace pin removed.
pub async fn leave(network: PodNetwork) -> Result<(), String> {
    tokio::task::spawn_blocking(move || network.detach().map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("pod network teardown panicked: {e}"))?
}
