//! vmrun's CRI v1 server.
//!
//! Two kinds of process serve it, as containerd and its shims do:
//!
//! - the **daemon** (`vmrun serve`, [`daemon`]) listens on the CRI socket,
//!   serves the ImageService itself, validates every request, and routes the
//!   RuntimeService calls of a pod to that pod's owner;
//! - one **sandbox owner** per pod (`vmrun-cri-shim`, [`owner`]), a detached
//!   process that holds the pod's sandbox and containers through the same
//!   `Runtime`/`Sandbox`/`Running` seam `vmrun run` uses, and serves the calls
//!   about its pod on a unix socket in the pod's directory, with the same CRI
//!   messages.
//!
//! Pods therefore outlive the daemon: a restarted `vmrun serve` finds the
//! owners' sockets under its state directory and serves their pods again.

// tonic's `Status` is the error type of every handler here; boxing it in
// each helper would only add conversions on the way back to tonic.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod daemon;
pub mod filters;
pub mod ids;
pub mod owner;
pub mod status;
pub mod translate;
pub mod unix;

pub use vmrun_cri_api::v1 as api;

/// Nanoseconds since the Unix epoch, CRI's timestamp unit.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
