//! gRPC over unix sockets, both ends: the CRI socket and the owners' sockets.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::api::runtime_service_client::RuntimeServiceClient;

/// Socket paths are limited to 107 bytes (`sun_path`), pod directories
/// under a deep state root are not: a longer path is reached through an
/// fd of its directory (`/proc/self/fd/N/NAME`), held while binding or
/// connecting.
fn with_short_path<T>(
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    const SUN_PATH_MAX: usize = 107;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::File::open(dir)?;
    use std::os::fd::AsRawFd;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    f(&short)
}

fn connect_stream(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let std_stream = with_short_path(path, |p| std::os::unix::net::UnixStream::connect(p))?;
    std_stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std_stream)
}

/// A channel to the gRPC server on `path`; fails now when nobody listens.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://vmrun.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::task::spawn_blocking(move || connect_stream(&path))
                    .await
                    .map_err(std::io::Error::other)??;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

pub async fn runtime_client(
    path: &Path,
) -> Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
    Ok(RuntimeServiceClient::new(connect(path).await?))
}

/// Binds a unix socket at `path`, replacing a stale socket file nobody
/// listens on; refuses when a live server is there.
pub async fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        if connect_stream(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another server is listening there", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = with_short_path(path, |p| {
        let l = std::os::unix::net::UnixListener::bind(p)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    use std::os::unix::fs::PermissionsExt;
    // Like containerd's socket: root and its group only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}
