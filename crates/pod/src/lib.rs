//! Pods from Kubernetes manifests: parsing, validation, the OCI specs of their
//! containers, and the lifecycle controller that runs them on a runtime.

pub mod command;
pub mod controller;
pub mod cpu_placement;
pub mod detach;
pub mod leftovers;
pub mod logs;
pub mod manifest;
pub mod native;
pub mod plan;
pub mod pod_network;
pub mod prepared;
pub mod probe;
pub mod quantity;
pub mod runtime;
pub mod seccomp;
pub mod signals;
pub mod spec;
pub mod state;
mod terminal;
pub mod vm;
pub mod wasm;
