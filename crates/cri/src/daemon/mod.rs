//! The CRI daemon, `vmrun serve`: the ImageService, and the RuntimeService
//! as a router to each pod's owner.

mod cleanup;
mod images;
mod registry;
mod runtime;
mod streaming;
mod streaming_vm;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use vmrun_image::{ImageStore, RegistryConfig};
use vmrun_pod::native::ProcViewSetup;

use crate::api;
use crate::config::CriConfig;

pub use cleanup::remove_leftover_pod;
pub use images::ImageServiceImpl;
pub use registry::Registry;
pub use runtime::RuntimeServiceImpl;

/// Everything `vmrun serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub cri: CriConfig,
    /// vmrun's state root; pods live under `<state>/cri/sandboxes/<id>`.
    pub state: PathBuf,
    pub image_root: PathBuf,
    pub registries: RegistryConfig,
    pub pids_limit: Option<i64>,
    pub proc_view: Option<ProcViewSetup>,
    /// What the `vm` handler's pod VMs boot with.
    pub vm_assets: vmrun_pod::vm::VmAssets,
    /// Upper bound on a pod VM's vCPUs (default: the host's CPUs).
    pub vm_max_vcpus: Option<u8>,
    /// The `vmrun-cri-shim` binary.
    pub shim: PathBuf,
}

impl ServeOptions {
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state.join("cri").join("sandboxes")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("image store {path}: {source}")]
    ImageStore {
        path: PathBuf,
        source: vmrun_image::OpenError,
    },
    #[error("pod state {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CRI socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("streaming server on {addr}: {source}")]
    Streaming {
        addr: std::net::SocketAddr,
        source: vmrun_streaming::StartError,
    },
    #[error("serving CRI: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves CRI on the configured socket until `shutdown` resolves. Pods keep
/// running when it returns (their owners are separate processes).
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let store = ImageStore::open(&opts.image_root, opts.registries.clone()).map_err(|source| {
        ServeError::ImageStore {
            path: opts.image_root.clone(),
            source,
        }
    })?;
    let sandboxes = opts.sandboxes_dir();
    std::fs::create_dir_all(&sandboxes).map_err(|source| ServeError::State {
        path: sandboxes.clone(),
        source,
    })?;
    let registry = Arc::new(Registry::recover(sandboxes).await);
    let addr = std::net::SocketAddr::new(opts.cri.stream_address, opts.cri.stream_port);
    let backend = Arc::new(streaming::StreamBackend {
        registry: registry.clone(),
    });
    let streams = vmrun_streaming::Server::start(
        vmrun_streaming::Config {
            addr,
            ..Default::default()
        },
        backend,
    )
    .await
    .map_err(|source| ServeError::Streaming { addr, source })?;
    tracing::info!("streaming server on {}", streams.local_addr());
    let listener = crate::unix::bind(&opts.cri.socket)
        .await
        .map_err(|source| ServeError::Socket {
            path: opts.cri.socket.clone(),
            source,
        })?;
    tracing::info!(
        "serving CRI on {} ({} pods found)",
        opts.cri.socket.display(),
        registry.len()
    );
    let opts = Arc::new(opts);
    let runtime = RuntimeServiceImpl::new(opts.clone(), registry, Arc::new(streams));
    let images = ImageServiceImpl::new(store);
    let socket = opts.cri.socket.clone();
    let served = tonic::transport::Server::builder()
        .add_service(api::runtime_service_server::RuntimeServiceServer::new(
            runtime,
        ))
        .add_service(api::image_service_server::ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(served?)
}
