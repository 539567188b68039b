//! `UpdateResources`: new OCI `LinuxResources` for a container, written to
//! its cgroup through the container library's cgroup interface (the same
//! mapping as at create time: v2 in the guest, v1 on a v1 host).

use oci_spec::runtime::LinuxResources;
use tonic::Status;
use vmrun_container::cgroups::{self, CgroupError};

use crate::containers::{ContainerError, Containers};

#[derive(Debug, thiserror::Error)]
pub enum UpdateResourcesError {
    #[error(transparent)]
    Lookup(#[from] ContainerError),
    #[error("update resources of container {id:?}: invalid LinuxResources JSON: {reason}")]
    InvalidJson { id: String, reason: String },
    #[error("update resources of container {id:?}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("update resources of container {id:?}: the agent's worker thread failed")]
    Worker { id: String },
}

impl From<UpdateResourcesError> for Status {
    fn from(e: UpdateResourcesError) -> Self {
        use UpdateResourcesError as E;
        let msg = e.to_string();
        match e {
            E::Lookup(e) => e.into(),
            E::InvalidJson { .. }
            | E::Cgroup {
                source: CgroupError::Unsupported { .. } | CgroupError::InvalidPath { .. },
                ..
            } => Status::invalid_argument(msg),
            // The kernel refused the value itself.
            E::Cgroup {
                source: CgroupError::Write { source, .. },
                ..
            } if matches!(
                source.raw_os_error(),
                Some(libc::EINVAL | libc::ERANGE | libc::EOVERFLOW)
            ) =>
            {
                Status::invalid_argument(msg)
            }
            // E.g. a v1 memory limit below what the container uses now.
            E::Cgroup {
                source: CgroupError::Write { source, .. },
                ..
            } if source.raw_os_error() == Some(libc::EBUSY) => Status::failed_precondition(msg),
            E::Cgroup { .. } | E::Worker { .. } => Status::internal(msg),
        }
    }
}

impl Containers {
    /// Applies `json` (a `LinuxResources`) to the container's cgroup. Only
    /// the fields present change. Not atomic: values applied before a
    /// refused one stay applied, as with `runc update`.
    pub(crate) async fn update_resources(
        &self,
        id: &str,
        json: &[u8],
    ) -> Result<(), UpdateResourcesError> {
        let path = self.live_cgroup(id)?;
        let resources: LinuxResources =
            serde_json::from_slice(json).map_err(|e| UpdateResourcesError::InvalidJson {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        // Lowering a memory limit makes the kernel reclaim first: blocking.
        let applied =
            tokio::task::spawn_blocking(move || cgroups::open_existing(&path)?.apply(&resources))
                .await
                .map_err(|_| UpdateResourcesError::Worker { id: id.to_string() })?;
        applied.map_err(|source| UpdateResourcesError::Cgroup {
            id: id.to_string(),
            source,
        })?;
        tracing::info!(container = id, "resources updated");
        Ok(())
    }
}
