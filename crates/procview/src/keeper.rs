//! The keeper: mounts the filesystem, holds `/dev/fuse`, and relays requests
//! to a worker process that answers them. The split is what keeps a crash
//! from hanging containers:
//!
//! * the keeper only moves whole FUSE messages and reads their 16-byte
//!   header; it has nothing to crash on;
//! * when the worker dies (or stops answering for [`REQUEST_TIMEOUT`]), the
//!   keeper answers every request it had handed it with EIO, starts a new
//!   worker and replays the kernel's INIT to it, so the mount, and every
//!   container's bind mount of its files, stays alive;
//! * if the keeper itself dies, the kernel aborts the connection: reads fail
//!   with ENOTCONN instead of hanging, and the next pod start mounts afresh.
//!
//! Keeper and worker talk over a SOCK_SEQPACKET pair, which keeps message
//! boundaries as `/dev/fuse` does, so the worker runs fuser's ordinary
//! session loop on its end.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use crate::fs::ProcView;
use crate::loadavg::Loads;
use crate::view::Roots;

/// The largest write the kernel may send (none is ever answered: the files
/// are read-only); the relay buffer must hold it.
pub const MAX_WRITE: u32 = 64 * 1024;
const BUFFER: usize = MAX_WRITE as usize + 4096;
/// A worker that has not answered a request for this long is killed and
/// replaced; the request fails with EIO.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Restarts within [`RESTART_WINDOW`] beyond which the keeper waits a second
/// before the next one (requests meanwhile fail with EIO).
const RESTART_BURST: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(10);
/// The worker's process name, as `ps` and tests see it.
pub const WORKER_NAME: &str = "procview-worker";

const FUSE_FORGET: u32 = 2;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;
/// statfs f_type of a FUSE mount.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{0} is already served by a running vmrun-procview")]
    AlreadyServed(PathBuf),
    #[error("create mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open /dev/fuse: {0} (is the fuse module loaded?)")]
    OpenFuse(Errno),
    #[error("mount the /proc view on {path}: {source}")]
    Mount { path: PathBuf, source: Errno },
    #[error("start a worker: {0}")]
    Worker(Errno),
    #[error("signals: {0}")]
    Signals(Errno),
    #[error("relay: {what}: {source}")]
    Relay { what: &'static str, source: Errno },
}

/// Whether `mountpoint` is a live FUSE mount answering requests.
pub fn is_served(mountpoint: &Path) -> bool {
    // f_type is i64 with glibc and u64 with musl (the guest agent).
    #[allow(clippy::unnecessary_cast)]
    let fuse = nix::sys::statfs::statfs(mountpoint)
        .map(|s| s.filesystem_type().0 as i64 == FUSE_SUPER_MAGIC)
        .unwrap_or(false);
    fuse && std::fs::metadata(mountpoint.join("meminfo")).is_ok()
}

/// Whether the top mount at `mountpoint` is a /proc view (alive or dead).
fn is_our_mount(mountpoint: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mountpoint.to_string_lossy();
    info.lines()
        .rev()
        .find(|l| l.split_whitespace().nth(4) == Some(&*want))
        .is_some_and(|l| l.contains(" - fuse.vmrun-procview "))
}

/// Mounts a new connection on `mountpoint`, first detaching a dead one left
/// by a keeper that crashed.
pub fn mount_view(mountpoint: &Path) -> Result<OwnedFd, KeeperError> {
    if is_served(mountpoint) {
        return Err(KeeperError::AlreadyServed(mountpoint.to_path_buf()));
    }
    // Not served, yet mounted: a keeper died. Its dead mounts may be stacked
    // (several died); peel them all. (stat alone cannot tell: the kernel
    // may answer it from the cache.)
    for _ in 0..64 {
        if !is_our_mount(mountpoint) || umount2(mountpoint, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    std::fs::create_dir_all(mountpoint).map_err(|source| KeeperError::MountPoint {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    let fuse = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(KeeperError::OpenFuse)?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fuse.as_raw_fd()
    );
    mount(
        Some("vmrun-procview"),
        mountpoint,
        Some("fuse.vmrun-procview"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .map_err(|source| KeeperError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    Ok(fuse)
}

struct Worker {
    pid: Pid,
    sock: OwnedFd,
    /// Requests handed over and not yet answered, with when.
    outstanding: HashMap<u64, Instant>,
    /// The replayed INIT, whose answer the kernel must not see twice.
    swallow: Option<u64>,
}

/// Forks a worker serving fuser's session on one end of a socket pair. The
/// keeper is single-threaded, so the child may run anything after fork.
/// `fuse` is closed in the child: only the keeper may hold the connection,
/// so that the kernel aborts it (ENOTCONN, no hang) when the keeper dies.
fn spawn_worker(roots: &Roots, fuse: &OwnedFd) -> Result<(Pid, OwnedFd), KeeperError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(KeeperError::Worker)?;
    // SAFETY: the keeper has one thread (it never starts another), so the
    // child's copy of the address space has no lock held by a lost thread.
    match unsafe { fork() }.map_err(KeeperError::Worker)? {
        ForkResult::Parent { child } => Ok((child, ours)),
        ForkResult::Child => {
            drop(ours);
            // SAFETY: the child's copy of the keeper's descriptor is never
            // used here; the keeper's own copy stays open.
            unsafe { libc::close(fuse.as_raw_fd()) };
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            let _ = nix::sys::prctl::set_name(c"procview-worker");
            let _ = SigSet::all().thread_unblock();
            let loads = Loads::default();
            loads.spawn_sampler(roots.proc.clone());
            let fs = ProcView::new(roots.clone(), loads);
            let mut session = fuser::Session::from_fd(fs, theirs, fuser::SessionACL::All);
            let code = match session.run() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vmrun-procview: worker: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

fn header(msg: &[u8]) -> Option<(u32, u64)> {
    let opcode = u32::from_ne_bytes(msg.get(4..8)?.try_into().ok()?);
    let unique = u64::from_ne_bytes(msg.get(8..16)?.try_into().ok()?);
    Some((opcode, unique))
}

/// fuse_out_header with an error and no payload.
fn error_reply(unique: u64, errno: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16u32.to_ne_bytes());
    out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
    out
}

struct Keeper {
    fuse: OwnedFd,
    roots: Roots,
    init: Option<Vec<u8>>,
    worker: Option<Worker>,
    restarts: Vec<Instant>,
    restart_at: Option<Instant>,
}

impl Keeper {
    fn reply(&self, msg: &[u8]) {
        // ENOENT: the request was interrupted meanwhile; nothing to do.
        let _ = nix::unistd::write(&self.fuse, msg);
    }

    fn start_worker(&mut self) -> Result<(), KeeperError> {
        let (pid, sock) = spawn_worker(&self.roots, &self.fuse)?;
        let mut w = Worker {
            pid,
            sock,
            outstanding: HashMap::new(),
            swallow: None,
        };
        if let Some(init) = &self.init {
            if let Some((_, unique)) = header(init) {
                w.swallow = Some(unique);
            }
            let _ = send(w.sock.as_raw_fd(), init, MsgFlags::MSG_NOSIGNAL);
        }
        self.worker = Some(w);
        Ok(())
    }

    /// The worker is gone or hung: fail what it held, reap it, and start
    /// another (or schedule one, after a burst of crashes).
    fn replace_worker(&mut self, why: &str) -> Result<(), KeeperError> {
        let Some(w) = self.worker.take() else {
            return Ok(());
        };
        eprintln!(
            "vmrun-procview: worker {} {why}; {} request(s) fail with EIO, restarting it",
            w.pid,
            w.outstanding.len()
        );
        for unique in w.outstanding.keys() {
            self.reply(&error_reply(*unique, libc::EIO));
        }
        let _ = nix::sys::signal::kill(w.pid, Signal::SIGKILL);
        let _ = waitpid(w.pid, None);
        let now = Instant::now();
        self.restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        self.restarts.push(now);
        if self.restarts.len() > RESTART_BURST {
            self.restart_at = Some(now + Duration::from_secs(1));
            Ok(())
        } else {
            self.start_worker()
        }
    }

    fn relay_request(&mut self, msg: &[u8]) -> Result<(), KeeperError> {
        let Some((opcode, unique)) = header(msg) else {
            return Ok(());
        };
        if opcode == FUSE_INIT {
            self.init = Some(msg.to_vec());
        }
        let Some(w) = self.worker.as_mut() else {
            if !matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT) {
                self.reply(&error_reply(unique, libc::EIO));
            }
            return Ok(());
        };
        if !matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT) {
            w.outstanding.insert(unique, Instant::now());
        }
        if send(w.sock.as_raw_fd(), msg, MsgFlags::MSG_NOSIGNAL).is_err() {
            self.replace_worker("cannot take requests")?;
        }
        Ok(())
    }

    fn relay_reply(&mut self, buf: &mut [u8]) -> Result<(), KeeperError> {
        let Some(w) = self.worker.as_mut() else {
            return Ok(());
        };
        match recv(w.sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => self.replace_worker("exited"),
            Ok(n) => {
                let Some((_, unique)) = header(&buf[..n]) else {
                    return Ok(());
                };
                if w.swallow == Some(unique) {
                    w.swallow = None;
                    return Ok(());
                }
                w.outstanding.remove(&unique);
                self.reply(&buf[..n]);
                Ok(())
            }
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(()),
            Err(_) => self.replace_worker("broke its socket"),
        }
    }

    /// How long poll may sleep before a deadline (a hung request or a
    /// scheduled restart) needs looking at.
    fn next_deadline(&self) -> Option<Duration> {
        let now = Instant::now();
        let hung = self
            .worker
            .as_ref()
            .and_then(|w| w.outstanding.values().min())
            .map(|t| (*t + REQUEST_TIMEOUT).saturating_duration_since(now));
        let restart = self.restart_at.map(|t| t.saturating_duration_since(now));
        hung.into_iter().chain(restart).min()
    }

    fn check_deadlines(&mut self) -> Result<(), KeeperError> {
        let hung = self.worker.as_ref().is_some_and(|w| {
            w.outstanding
                .values()
                .any(|t| t.elapsed() >= REQUEST_TIMEOUT)
        });
        if hung {
            self.replace_worker("did not answer in time")?;
        }
        if self.restart_at.is_some_and(|t| Instant::now() >= t) {
            self.restart_at = None;
            self.start_worker()?;
        }
        Ok(())
    }
}

/// Serves `mountpoint` until it is unmounted or the process gets SIGTERM or
/// SIGINT (which unmount it). `ready` runs once the mount is in place.
pub fn serve(mountpoint: &Path, roots: Roots, ready: impl FnOnce()) -> Result<(), KeeperError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(KeeperError::Signals)?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(KeeperError::Signals)?;
    let fuse = mount_view(mountpoint)?;
    let mut k = Keeper {
        fuse,
        roots,
        init: None,
        worker: None,
        restarts: Vec::new(),
        restart_at: None,
    };
    k.start_worker()?;
    ready();
    let mut buf = vec![0u8; BUFFER];
    loop {
        let timeout = match k.next_deadline() {
            Some(d) => PollTimeout::try_from(d.as_millis().min(60_000) as i32 + 1)
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let (kernel_ready, worker_ready, signalled) = {
            let mut fds = vec![
                PollFd::new(k.fuse.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(w) = &k.worker {
                fds.push(PollFd::new(w.sock.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(KeeperError::Relay {
                        what: "poll",
                        source,
                    })
                }
                Ok(_) => {}
            }
            let has = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (has(0), has(2), has(1))
        };
        if signalled {
            // Containers still holding bind mounts of the files then get
            // ENOTCONN from them, never a hang.
            let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
            break;
        }
        if worker_ready {
            k.relay_reply(&mut buf)?;
        }
        if kernel_ready {
            match nix::unistd::read(&k.fuse, &mut buf) {
                Ok(n) => {
                    let msg = buf[..n].to_vec();
                    k.relay_request(&msg)?;
                }
                // Interrupted before we read it / try again.
                Err(Errno::ENOENT | Errno::EINTR | Errno::EAGAIN) => {}
                // Unmounted: done.
                Err(Errno::ENODEV) => break,
                Err(source) => {
                    return Err(KeeperError::Relay {
                        what: "read /dev/fuse",
                        source,
                    })
                }
            }
        }
        k.check_deadlines()?;
    }
    if let Some(w) = k.worker.take() {
        let _ = nix::sys::signal::kill(w.pid, Signal::SIGKILL);
        let _ = waitpid(w.pid, None);
    }
    Ok(())
}
