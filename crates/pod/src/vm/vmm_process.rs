//! One `vmrun-vmm` process per pod: how it is started, watched and stopped.

use std::fs::File;
use std::os::fd::OwnedFd;
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
}

impl VmFiles {
    pub fn new(dir: &Path) -> Self {
        VmFiles {
            dir: dir.to_path_buf(),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }
}

pub struct VmmProcess {
    child: Mutex<Child>,
    pidfd: OwnedFd,
    pub files: VmFiles,
}

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
    pub fn spawn(
        assets: &VmAssets,
        size: VmSize,
        disks: &[VmDisk],
        files: VmFiles,
    ) -> Result<Self, String> {
        let log = File::create(&files.vmm_log)
            .map_err(|e| format!("{}: {e}", files.vmm_log.display()))?;
        let mut cmd = Command::new(&assets.vmm);
        cmd.arg("--kernel")
            .arg(&assets.kernel)
            .arg("--initrd")
            .arg(&assets.initramfs)
            .args(["--cmdline", GUEST_CMDLINE])
            .args(["--vcpus", &size.vcpus.to_string()])
            .args(["--memory", &size.memory_mib.to_string()])
            .arg("--vsock")
            .arg(&files.vsock)
            // An idle pod VM gives the memory its guest freed back to the host.
            .arg("--free-page-reporting")
            .arg("--console")
            .arg(&files.console);
        for disk in disks {
            let mut arg = disk.path.as_os_str().to_owned();
            if disk.read_only {
                arg.push(",ro");
            }
            cmd.arg("--disk").arg(arg);
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
        Ok(VmmProcess {
            child: Mutex::new(child),
            pidfd,
            files,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
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
