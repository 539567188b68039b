//! Host <-> guest-agent protocol: the `vmrun.agent.v1.Agent` gRPC service
//! (generated from `proto/agent.proto`) and the host's client connector for
//! the VMM's hybrid vsock; plus the agent's port-forward protocol
//! ([`port_forward`]), which gives the host TCP connections inside the pod.

mod hybrid_vsock;
pub mod port_forward;

/// Generated messages, client (`agent_client::AgentClient`) and server
/// (`agent_server::{Agent, AgentServer}`).
#[allow(clippy::all, clippy::pedantic, clippy::undocumented_unsafe_blocks)]
pub mod v1 {
    tonic::include_proto!("vmrun.agent.v1");
}

pub use hybrid_vsock::{connect_hybrid_vsock, handshake, ConnectError};
pub use port_forward::{connect_guest_tcp, connect_guest_tcp_blocking};
pub use v1::agent_client::AgentClient;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest vsock port of the agent's port-forward listener: a connection
/// sends `<tcp port>\n` and, after `OK\n`, is a TCP connection to
/// `127.0.0.1:<tcp port>` inside the pod's network namespace (kubelet-style
/// `httpGet`/`tcpSocket` probes and hooks). See [`port_forward`] for the
/// protocol and [`connect_guest_tcp`] for the host side.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1025;

/// The guest's vsock context id (the host is 2).
pub const GUEST_CID: u32 = 3;

/// Bumped on incompatible changes to `agent.proto`; reported by `Health`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bumped on compatible additions to `agent.proto` (new RPCs or fields)
/// within [`PROTOCOL_VERSION`]; reported by `Health` so the host can tell
/// what an agent supports. 1: `ResizeTty`, `UpdateResources`, `OomEvents`,
/// `DestroySandbox` and terminals for `process.terminal` processes.
/// 2: `CopyFile.tmpfs_size_bytes` (size-limited emptyDirs).
/// 3: `ConfigureNetwork` (pod networking of vm pods).
/// 4: `StatsResponse.writable_layer`.
pub const PROTOCOL_REVISION: u32 = 4;
