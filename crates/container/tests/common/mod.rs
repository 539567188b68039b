//! Shared helpers for the root-only integration tests: a busybox rootfs,
//! a CRI-like spec, running a container and capturing its output, and
//! checks that nothing is left behind.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use oci_spec::runtime::Spec;
use serde_json::{json, Value};
use vmrun_container::{Container, ContainerConfig, Created, Rootfs, Stdio};

/// Integration tests need root (namespaces, mounts, cgroups). CI runs them
/// as root, so not being root is a loud failure, not a silent skip.
pub fn require_root(test: &str) {
    if !nix::unistd::geteuid().is_root() {
        panic!("{test}: this integration test must run as root (namespaces, mounts, cgroups); run `cargo test` as root");
    }
    if !Path::new("/usr/bin/busybox").exists() && !Path::new("/bin/busybox").exists() {
        panic!(
            "{test}: needs a static busybox at /usr/bin/busybox (apt-get install busybox-static)"
        );
    }
}

fn busybox() -> PathBuf {
    ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox")
}

/// A minimal image: bin/busybox plus a symlink per applet.
pub fn build_busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(busybox(), dir.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox())
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" || applet.contains('/') || applet.is_empty() {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

/// A test's private world: a rootfs and a unique cgroup parent.
pub struct Fixture {
    pub name: String,
    pub tmp: tempfile::TempDir,
    pub cgroup_parent: String,
}

impl Fixture {
    pub fn new(name: &str) -> Self {
        require_root(name);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("vmrun-test-{name}-"))
            .tempdir()
            .unwrap();
        build_busybox_rootfs(&tmp.path().join("rootfs"));
        Fixture {
            name: name.to_string(),
            cgroup_parent: format!("/vmrun-test-{}-{name}", std::process::id()),
            tmp,
        }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.tmp.path().join("rootfs")
    }

    pub fn cgroup_path(&self, ctr: &str) -> String {
        format!("{}/{ctr}", self.cgroup_parent)
    }

    /// A spec like containerd's CRI plugin generates for `args`.
    pub fn spec(&self, ctr: &str, args: &[&str]) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": self.rootfs(), "readonly": false},
            "hostname": ctr,
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
                "cwd": "/",
                "capabilities": {
                    "bounding": CAPS, "effective": CAPS, "permitted": CAPS
                },
                "noNewPrivileges": true,
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid","noexec","nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","strictatime","mode=755","size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid","noexec","nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid","noexec","nodev","ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid","noexec","nodev","relatime","ro"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid","noexec","nodev","mode=1777","size=65536k"]}
            ],
            "linux": {
                "cgroupsPath": self.cgroup_path(ctr),
                "namespaces": [{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"network"},{"type":"cgroup"}],
                "maskedPaths": ["/proc/acpi","/proc/kcore","/proc/keys","/proc/latency_stats","/proc/timer_list","/proc/timer_stats","/proc/sched_debug","/proc/scsi","/sys/firmware"],
                "readonlyPaths": ["/proc/asound","/proc/bus","/proc/fs","/proc/irq","/proc/sys","/proc/sysrq-trigger"]
            }
        })
    }

    /// Checks that nothing of this fixture remains: cgroup directories in
    /// every hierarchy, and mounts of its tempdir on the host.
    pub fn assert_clean(&self) {
        let _ = vmrun_container::cgroups::remove_path(&self.cgroup_parent);
        for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = entry
                .path()
                .join(self.cgroup_parent.trim_start_matches('/'));
            assert!(
                !p.exists(),
                "{}: cgroup dir left behind: {}",
                self.name,
                p.display()
            );
        }
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let tmp = self.tmp.path().to_string_lossy().to_string();
        assert!(
            !info.lines().any(|l| l.contains(&tmp)),
            "{}: mounts left behind:\n{}",
            self.name,
            info.lines()
                .filter(|l| l.contains(&tmp))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = vmrun_container::cgroups::remove_path(&self.cgroup_parent);
    }
}

use vmrun_container::DEFAULT_CAPABILITIES as CAPS;

pub fn to_spec(v: Value) -> Spec {
    serde_json::from_value(v).expect("spec json")
}

/// A pipe whose read end is drained by a thread into a String.
pub struct Capture {
    reader: Option<JoinHandle<String>>,
}

pub fn pipe_capture() -> (OwnedFd, Capture) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    });
    (
        w,
        Capture {
            reader: Some(reader),
        },
    )
}

impl Capture {
    /// Everything written, once every writer has closed the pipe.
    pub fn text(mut self) -> String {
        self.reader.take().unwrap().join().unwrap()
    }
}

pub struct Outputs {
    pub stdout: Capture,
    pub stderr: Capture,
}

pub fn create(
    id: &str,
    spec: Value,
    rootfs: Rootfs,
) -> (Result<Created, vmrun_container::CreateError>, Outputs) {
    create_with_stdin(id, spec, rootfs, None)
}

pub fn create_with_stdin(
    id: &str,
    spec: Value,
    rootfs: Rootfs,
    stdin: Option<OwnedFd>,
) -> (Result<Created, vmrun_container::CreateError>, Outputs) {
    let (out_w, stdout) = pipe_capture();
    let (err_w, stderr) = pipe_capture();
    let cfg = ContainerConfig {
        id: id.to_string(),
        spec: to_spec(spec),
        rootfs,
        stdio: Stdio {
            stdin,
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
        console: vmrun_container::Console::Passed,
    };
    (
        vmrun_container::create(cfg, &vmrun_container::LinuxSyscall),
        Outputs { stdout, stderr },
    )
}

/// Destroys the container when dropped, so a failing assertion does not
/// leak processes and cgroups into the next run.
pub struct Guarded(pub Container);

impl std::ops::Deref for Guarded {
    type Target = Container;
    fn deref(&self) -> &Container {
        &self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

pub fn start(id: &str, spec: Value, rootfs: Rootfs) -> (Guarded, Outputs) {
    start_with_stdin(id, spec, rootfs, None)
}

pub fn start_with_stdin(
    id: &str,
    spec: Value,
    rootfs: Rootfs,
    stdin: Option<OwnedFd>,
) -> (Guarded, Outputs) {
    let (created, out) = create_with_stdin(id, spec, rootfs, stdin);
    let created = created.unwrap_or_else(|e| panic!("create {id}: {e}"));
    let c = created
        .start()
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    (Guarded(c), out)
}

/// Runs to completion; returns (exit code, stdout, stderr) after destroy.
pub fn run(fx: &Fixture, ctr: &str, spec: Value) -> (i32, String, String) {
    let (c, out) = start(ctr, spec, Rootfs::Dir(fx.rootfs()));
    let status = c.wait().unwrap();
    c.destroy().unwrap();
    (status.code, out.stdout.text(), out.stderr.text())
}

pub fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
