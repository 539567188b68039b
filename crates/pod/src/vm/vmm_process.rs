//! One `vmrun-vmm` process per pod: how it is started, watched and stopped.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::disks::VmDisk;
use super::sizing::VmSize;

/// The guest side of every pod VM: the VMM binary, the guest kernel and the
/// agent's initramfs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmAssets {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl VmAssets {
    /// Checks the files exist, naming the missing one and how to get it.
    pub fn check(&self) -> Result<(), String> {
        for (what, path, hint) in [
            ("vmrun-vmm", &self.vmm, "build the workspace (cargo build)"),
            ("guest kernel", &self.kernel, "run scripts/build-guest"),
            (
                "guest initramfs",
                &self.initramfs,
                "run scripts/build-guest",
            ),
        ] {
            if !path.is_file() {
                return Err(format!("{what} {} not found: {hint}", path.display()));
            }
        }
        Ok(())
    }
}

/// How a pod's VMM is confined: `vmrun-vmm --jail`, the VM directory its
/// root, as `uid`:`gid` (its per-thread seccomp filters are always on).
/// Jailing needs root; a vmrun that is not root starts its VMMs unjailed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmJail {
    pub enabled: bool,
    pub uid: u32,
    pub gid: u32,
}

/// nobody:nogroup on Debian.
pub const DEFAULT_JAIL_ID: u32 = 65534;

impl Default for VmmJail {
    fn default() -> Self {
        VmmJail {
            enabled: true,
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID,
        }
    }
}

/// Files of one VM, in the pod's `vm/` directory.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
    /// The hybrid vsock socket: `CONNECT <port>` reaches the guest.
    pub vsock: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// The VMM's own stderr (its exit reason).
    pub vmm_log: PathBuf,
    /// The VMM's control socket (line-delimited JSON), for disks attached
    /// after boot.
    pub api: PathBuf,
}

impl VmFiles {
    pub fn new(dir: &Path) -> Self {
        VmFiles {
            dir: dir.to_path_buf(),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            api: dir.join("api.sock"),
        }
    }
}

/// How long the VMM's control socket may take to answer.
const API_TIMEOUT: Duration = Duration::from_secs(10);

pub struct VmmProcess {
    child: Mutex<Child>,
    pidfd: OwnedFd,
    pub files: VmFiles,
    /// Where the VMM's sockets are reached: its fd of the VM directory
    /// (`/proc/<vmm pid>/fd/3`), a path that fits in a socket address
    /// however deep the pod's directory is (a CRI pod's is 150 bytes and
    /// more; `sun_path` takes 107).
    socket_dir: PathBuf,
}

/// The VMM's descriptor of the VM directory (opened on the host, so it
/// stays the host's path of it in a jailed VMM): the host reaches the
/// VMM's sockets through `/proc/<pid>/fd/3/`, and finds orphaned VMMs by it
/// ([`crate::leftovers`]).
const DIR_FD: i32 = 3;

/// Kernel command line of pod VMs; the VMM appends the virtio-mmio devices.
/// `reboot=k panic=-1`: a shutdown and a panic both reset the VM, which the
/// VMM tells apart (it reports a panic as a failure).
/// `vmrun.page_reporting_order=5`: the agent has the guest report free
/// blocks from 128 KiB up instead of 2 MiB up; an idle pod VM then hands
/// back its fragmented free memory too (guest RAM PSS 31.0 -> 29.6 MiB,
/// nested, docs/benchmarks.md), while a busy guest still reports no
/// single pages it is about to reuse.
pub const GUEST_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet printk.devkmsg=on vmrun.page_reporting_order=5";

impl VmmProcess {
    /// Starts the VMM with `disks` and `spare_disks` empty slots after
    /// them (filled later with [`VmmProcess::attach_disk`]), jailed in the
    /// VM directory as `jail` says.
    pub fn spawn(
        assets: &VmAssets,
        size: VmSize,
        disks: &[VmDisk],
        spare_disks: u8,
        pod_network: bool,
        jail: &VmmJail,
        files: VmFiles,
    ) -> Result<Self, String> {
        let log = File::create(&files.vmm_log)
            .map_err(|e| format!("{}: {e}", files.vmm_log.display()))?;
        let dir = nix::fcntl::open(
            &files.dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("{}: {e}", files.dir.display()))?;
        // The VMM works in the VM directory (its jail's root once jailed):
        // its own files are named relative to it.
        let in_vmm =
            |path: &Path| -> PathBuf { PathBuf::from(path.file_name().unwrap_or_default()) };
        let mut cmd = Command::new(&assets.vmm);
        cmd.current_dir(&files.dir);
        // SAFETY: geteuid has no preconditions.
        if jail.enabled && unsafe { libc::geteuid() } == 0 {
            cmd.args(["--jail", "."])
                .args(["--jail-uid", &jail.uid.to_string()])
                .args(["--jail-gid", &jail.gid.to_string()]);
        }
        cmd.arg("--kernel")
            .arg(&assets.kernel)
            .arg("--initrd")
            .arg(&assets.initramfs)
            .args(["--cmdline", GUEST_CMDLINE])
            .args(["--vcpus", &size.vcpus.to_string()])
            .args(["--memory", &size.memory_mib.to_string()])
            .arg("--vsock")
            .arg(in_vmm(&files.vsock))
            // An idle pod VM gives the memory its guest freed back to the host.
            .arg("--free-page-reporting")
            .arg("--console")
            .arg(in_vmm(&files.console))
            // Always there: disks attached late, and the seccomp test hook.
            .arg("--api")
            .arg(in_vmm(&files.api));
        for disk in disks {
            let mut arg = disk.path.as_os_str().to_owned();
            if disk.read_only {
                arg.push(",ro");
            }
            cmd.arg("--disk").arg(arg);
        }
        if spare_disks > 0 {
            cmd.args(["--spare-disks", &spare_disks.to_string()]);
        }
        if pod_network {
            // Created by the VMM in the namespace it gets below.
            cmd.arg("--net").arg(super::network::TAP);
        }
        let dir_fd = dir.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls: unshare, and dup2/fcntl on `dir`,
        // which stays open in the parent until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                if pod_network && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = if dir_fd == DIR_FD {
                    // Already in place (dup2 would keep close-on-exec).
                    libc::fcntl(dir_fd, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(dir_fd, DIR_FD) >= 0
                };
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", assets.vmm.display()))?;
        let pidfd = match crate::native::pidfd_open(child.id() as i32) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("pidfd of the VMM: {e}"));
            }
        };
        drop(dir);
        let socket_dir = Path::new("/proc")
            .join(child.id().to_string())
            .join("fd")
            .join(DIR_FD.to_string());
        Ok(VmmProcess {
            child: Mutex::new(child),
            pidfd,
            files,
            socket_dir,
        })
    }

    /// Puts the disk image `path` in the VM's next empty disk slot (the
    /// guest sees the slot's disk grow from size 0); its guest index, 0
    /// being `/dev/vda`. The file is opened here and passed to the VMM,
    /// which a jail keeps from opening host paths.
    pub fn attach_disk(&self, path: &Path, read_only: bool) -> Result<usize, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("disk image {}: {e}", path.display()))?;
        let request = serde_json::json!({
            "action": "attach_disk",
            "path": path,
            "read_only": read_only,
        });
        let reply = self.api_call(&request, Some(&file))?;
        match reply["disk"].as_u64() {
            Some(disk) if reply["ok"] == true => Ok(disk as usize),
            _ => Err(format!(
                "the VMM did not attach {}: {}",
                path.display(),
                reply["error"].as_str().unwrap_or("no reason given")
            )),
        }
    }

    /// One request on the VMM's control socket, with `file` passed along
    /// (SCM_RIGHTS) if given, and its one-line reply.
    fn api_call(
        &self,
        request: &serde_json::Value,
        file: Option<&File>,
    ) -> Result<serde_json::Value, String> {
        use std::io::{BufRead, BufReader, Write};
        let api = &self.api_addr();
        let fail = |e: std::io::Error| format!("the VMM's control socket {}: {e}", api.display());
        let stream = std::os::unix::net::UnixStream::connect(api).map_err(fail)?;
        stream.set_read_timeout(Some(API_TIMEOUT)).map_err(fail)?;
        let mut line = request.to_string();
        line.push('\n');
        match file {
            Some(file) => send_with_file(&stream, line.as_bytes(), file).map_err(fail)?,
            None => (&stream).write_all(line.as_bytes()).map_err(fail)?,
        }
        let mut reply = String::new();
        BufReader::new(&stream)
            .read_line(&mut reply)
            .map_err(fail)?;
        serde_json::from_str(&reply)
            .map_err(|e| format!("the VMM's control socket answered {reply:?}: {e}"))
    }

    /// The hybrid vsock socket's address for any process of the host
    /// (while the VMM runs).
    pub fn vsock_addr(&self) -> PathBuf {
        self.socket_dir
            .join(self.files.vsock.file_name().unwrap_or_default())
    }

    fn api_addr(&self) -> PathBuf {
        self.socket_dir
            .join(self.files.api.file_name().unwrap_or_default())
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    /// The VMM's CPU time (every thread's, user and system, in ns) and its
    /// resident memory in bytes: what the pod VM costs the host.
    pub fn host_usage(&self) -> std::io::Result<(u64, u64)> {
        let pid = self.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        parse_host_usage(&stat, &status, clock_ticks_per_second())
    }

    /// The exit status, if the VMM has exited.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the VMM to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        match crate::native::poll_exit(&self.pidfd, Some(timeout)) {
            Ok(true) => self.try_exit(),
            _ => None,
        }
    }

    /// Kills the VMM (the guest goes with it) and reaps it.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Why the VMM ended, for error messages: its own last line, else the
    /// console's last lines.
    pub fn exit_reason(&self, status: Option<ExitStatus>) -> String {
        let vmm = tail(&self.files.vmm_log, 3);
        let console = tail(&self.files.console, 8);
        let status = status.map_or("still running".to_string(), |s| s.to_string());
        match (vmm.is_empty(), console.is_empty()) {
            (false, _) => format!("VMM {status}: {vmm}"),
            (true, false) => format!("VMM {status}; guest console ends with: {console}"),
            (true, true) => format!("VMM {status}"),
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes all of `bytes`, the first part with `file`'s descriptor.
fn send_with_file(
    stream: &std::os::unix::net::UnixStream,
    bytes: &[u8],
    file: &File,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::Write;
    let fds = [file.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    let mut writer = stream;
    writer.write_all(&bytes[sent..])
}

/// The last `lines` non-empty lines of a file, joined with " | ".
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let last: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    last[last.len().saturating_sub(lines)..].join(" | ")
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// CPU ns and resident bytes from a process's `/proc/PID/stat` and
/// `/proc/PID/status`.
fn parse_host_usage(
    stat: &str,
    status: &str,
    ticks_per_second: u64,
) -> std::io::Result<(u64, u64)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    // The command name (field 2) may hold spaces and parentheses: the
    // fields that follow start after its last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| bad("no command name in /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let ticks = |i: usize| -> std::io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| bad("no utime/stime in /proc/PID/stat"))
    };
    let cpu_ns = (ticks(11)? + ticks(12)?).saturating_mul(1_000_000_000 / ticks_per_second.max(1));
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| bad("no VmRSS in /proc/PID/status"))?;
    Ok((cpu_ns, rss_kib * 1024))
}

#[cfg(test)]
mod host_usage_tests {
    use super::parse_host_usage;

    #[test]
    fn cpu_and_rss_come_from_stat_and_status() {
        let stat = "4242 (vmrun vmm (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 5 0 100 1000 300";
        let status = "Name:\tvmrun-vmm\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t5\n";
        let (cpu, rss) = parse_host_usage(stat, status, 100).unwrap();
        assert_eq!(cpu, 3_000_000_000, "250 + 50 ticks at 100 Hz");
        assert_eq!(rss, 2048 * 1024);
    }

    #[test]
    fn a_truncated_stat_is_an_error_not_a_panic() {
        assert!(parse_host_usage("4242 (vmm) S 1 2", "VmRSS: 1 kB", 100).is_err());
        assert!(parse_host_usage("no name here", "VmRSS: 1 kB", 100).is_err());
        let stat = "1 (a) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0";
        assert!(parse_host_usage(stat, "Name: a", 100).is_err());
    }
}
