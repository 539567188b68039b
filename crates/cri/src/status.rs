//! Errors as gRPC statuses: each names what was wrong, so that kubelet's
//! events and crictl's output say it.

use tonic::{Code, Status};
use vmrun_pod::runtime::RuntimeError;

use crate::translate::InvalidConfig;

impl From<InvalidConfig> for Status {
    fn from(e: InvalidConfig) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// A runtime failure: `Unavailable` runtimes are `Unimplemented` (the
/// request may be fine, this build cannot serve it); the rest `Unknown`,
/// as containerd reports runtime errors.
pub fn runtime_status(e: RuntimeError) -> Status {
    match e {
        RuntimeError::Unavailable { .. } => Status::unimplemented(e.to_string()),
        other => Status::new(Code::Unknown, other.to_string()),
    }
}

pub fn sandbox_not_found(id: &str) -> Status {
    Status::not_found(format!("pod sandbox {id:?} not found"))
}

pub fn container_not_found(id: &str) -> Status {
    Status::not_found(format!("container {id:?} not found"))
}
