//! Pod network namespaces pinned by a bind mount on a file, so that they
//! outlive every process in them and plugins can enter them by path.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Why a namespace could not be made, entered or removed.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot create netns pin file {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot create a network namespace for {path}: unshare: {source}")]
    Unshare { path: PathBuf, source: Errno },
    #[error("cannot pin network namespace {from} at {path}: {source}")]
    Mount {
        from: PathBuf,
        path: PathBuf,
        source: Errno,
    },
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: Errno },
    #[error("cannot unmount network namespace {path}: {source}")]
    Unmount { path: PathBuf, source: Errno },
    #[error("cannot remove netns pin file {path}: {source}")]
    RemoveFile { path: PathBuf, source: io::Error },
    #[error("cannot start a thread for network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
    #[error("the code run in network namespace {path} panicked")]
    Panicked { path: PathBuf },
    #[error("in network namespace {path}, {action} {addr}: {source}")]
    Socket {
        path: PathBuf,
        action: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// A network namespace pinned at a path. Dropping it leaves the namespace
/// in place: [`NetNs::remove`] ends it, so a runtime restart can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Makes a new, empty network namespace (only a down `lo`) pinned at
    /// `path`, whose parent directory is created if needed. `path` must not
    /// exist yet, so an existing namespace is never covered.
    pub fn create(path: impl Into<PathBuf>) -> Result<NetNs, NetNsError> {
        let path = path.into();
        create_pin_file(&path)?;
        let pinned = on_fresh_thread(&path, || {
            // This thread alone moves into the new namespace; it ends right
            // after, so no other code ever runs in it by accident.
            unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetNsError::Unshare {
                path: path.clone(),
                source,
            })?;
            let tid = nix::unistd::gettid();
            bind(
                &PathBuf::from(format!("/proc/self/task/{tid}/ns/net")),
                &path,
            )
        })
        .and_then(|inner| inner);
        if let Err(error) = pinned {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(NetNs { path })
    }

    /// Pins the network namespace of process `pid` at `path` (e.g. a VM
    /// helper that unshared its own).
    pub fn pin_process(pid: u32, path: impl Into<PathBuf>) -> Result<NetNs, NetNsError> {
        let path = path.into();
        create_pin_file(&path)?;
        if let Err(error) = bind(&PathBuf::from(format!("/proc/{pid}/ns/net")), &path) {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(NetNs { path })
    }

    /// A namespace pinned earlier, e.g. found again after a restart. Fails
    /// when there is nothing at `path` to open.
    pub fn open(path: impl Into<PathBuf>) -> Result<NetNs, NetNsError> {
        let path = path.into();
        File::open(&path).map_err(|source| NetNsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(NetNs { path })
    }

    /// The pin path, which is what CNI_NETNS gets.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unpins and deletes; see [`remove`].
    pub fn remove(self) -> Result<(), NetNsError> {
        remove(&self.path)
    }

    /// Runs `work` inside this namespace; see [`run_in`].
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, work: F) -> Result<T, NetNsError> {
        run_in(&self.path, work)
    }
}

fn create_pin_file(path: &Path) -> Result<(), NetNsError> {
    let error = |source| NetNsError::CreateFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map(drop)
        .map_err(error)
}

fn bind(from: &Path, path: &Path) -> Result<(), NetNsError> {
    mount(
        Some(from),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| NetNsError::Mount {
        from: from.to_path_buf(),
        path: path.to_path_buf(),
        source,
    })
}

/// Unpins the namespace at `path` (lazily, so a plugin still inside does
/// not make this fail) and deletes the file. Nothing at `path`, or a file
/// that is not mounted, is fine: teardown can be repeated.
pub fn remove(path: &Path) -> Result<(), NetNsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (already unpinned); ENOENT: gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(source) => {
            return Err(NetNsError::Unmount {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetNsError::RemoveFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn on_fresh_thread<T: Send, F: FnOnce() -> T + Send>(
    path: &Path,
    work: F,
) -> Result<T, NetNsError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("vmrun-netns".into())
            .spawn_scoped(scope, work)
            .map_err(|source| NetNsError::Thread {
                path: path.to_path_buf(),
                source,
            })?;
        handle.join().map_err(|_| NetNsError::Panicked {
            path: path.to_path_buf(),
        })
    })
}

/// Runs `work` on a new thread that has entered the namespace at `path`,
/// leaving the caller's thread where it is. Sockets made by `work` stay in
/// that namespace after it returns, which is how port-forward reaches a pod.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(path: &Path, work: F) -> Result<T, NetNsError> {
    let ns = File::open(path).map_err(|source| NetNsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    on_fresh_thread(path, move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetNsError::Enter {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(work())
    })
    .and_then(|inner| inner)
}

/// A TCP connection to `addr` made from inside the namespace at `path`.
pub fn connect_tcp(
    path: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, NetNsError> {
    run_in(path, || TcpStream::connect_timeout(&addr, timeout))?.map_err(|source| {
        NetNsError::Socket {
            path: path.to_path_buf(),
            action: "connecting to",
            addr,
            source,
        }
    })
}

/// A TCP listener on `addr` inside the namespace at `path`.
pub fn listen_tcp(path: &Path, addr: SocketAddr) -> Result<TcpListener, NetNsError> {
    run_in(path, || TcpListener::bind(addr))?.map_err(|source| NetNsError::Socket {
        path: path.to_path_buf(),
        action: "listening on",
        addr,
        source,
    })
}
