//! The Container Runtime Interface, v1: what kubelet and crictl speak to a
//! runtime. Generated from Kubernetes' own proto (see build.rs); nothing in
//! here is vmrun's.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

/// The CRI version this crate speaks, as `Version` reports it.
pub const RUNTIME_API_VERSION: &str = "v1";
