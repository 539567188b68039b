//! The vmrun guest agent: PID 1 of a vmrun microVM.
//!
//! The binary (`main.rs`) prepares the guest ([`init`]) and serves
//! [`AgentService`], the `vmrun.agent.v1.Agent` gRPC service, on vsock port
//! 1024. The service itself is plain library code so it can also be served on
//! a unix socket on the host, which is how it is tested. Next to it, on
//! vsock port 1025, the agent serves TCP forwarding into the pod's network
//! namespace ([`AgentService::serve_port_forward`]).
//!
//! Process model inside the guest: PID 1 forks once, right after mounting the
//! filesystems, and the child runs the gRPC server. PID 1 then only reaps:
//! orphans re-parented to it, and the server, whose exit powers the guest off.
//! The server's own children (containers, exec'd processes and the container
//! library's helpers) are reaped only by the container library, so no exit
//! status can be stolen by a `waitpid(-1)`.

#[doc(hidden)]
pub mod fuzzing;
pub mod init;
pub mod log;
pub mod service;

mod containers;
mod files;
mod forward;
mod network;
mod oom;
mod process;
mod resources;
mod sandbox;
mod sysinfo;
mod tty;

pub use sysinfo::boottime_ns;

pub use service::{AgentConfig, AgentService};
