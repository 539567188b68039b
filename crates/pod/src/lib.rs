//! Pods from Kubernetes manifests: parsing, validation, the OCI specs of their
//! containers, and the lifecycle controller that runs them on a runtime.

pub mod command;
pub mod manifest;
pub mod plan;
pub mod quantity;
