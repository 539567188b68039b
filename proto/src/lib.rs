//! Host <-> guest-agent protocol: the `vmrun.agent.v1.Agent` gRPC service
//! (generated from `proto/agent.proto`) and the host's client connector for
//! the VMM's hybrid vsock.

mod hybrid_vsock;

/// Generated messages, client (`agent_client::AgentClient`) and server
/// (`agent_server::{Agent, AgentServer}`).
#[allow(clippy::all, clippy::pedantic, clippy::undocumented_unsafe_blocks)]
pub mod v1 {
    tonic::include_proto!("vmrun.agent.v1");
}

pub use hybrid_vsock::{connect_hybrid_vsock, handshake, ConnectError};
pub use v1::agent_client::AgentClient;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest's vsock context id (the host is 2).
pub const GUEST_CID: u32 = 3;

/// Bumped on incompatible changes to `agent.proto`; reported by `Health`.
pub const PROTOCOL_VERSION: u32 = 1;
