//! The `vmrun-vmm` binary jailed and under its seccomp filters, on the real
//! /dev/kvm (a guest that spins, so the VMM runs until told otherwise).
//! Needs root, as the pod runtime that jails its VMMs does.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{require_kvm, temp_file};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `jmp .`: the vCPU stays in the guest.
const SPIN: &[u8] = &[0xeb, 0xfe];
const JAIL_UID: u32 = 65534;

struct Jailed {
    child: Child,
    dir: tempfile::TempDir,
    _kernel: tempfile::TempPath,
}

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Jailed {
    fn start() -> Jailed {
        let (kernel_guard, kernel) = temp_file(&support::elf_image(SPIN, true));
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vmrun-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "64", "--console", "console.log"])
            .args(["--api", "api.sock", "--spare-disks", "1"])
            .args(["--vsock", "vsock.sock"])
            .arg("--jail")
            .arg(dir.path())
            .args(["--jail-uid", &JAIL_UID.to_string()])
            .args(["--jail-gid", &JAIL_UID.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut jailed = Jailed {
            child,
            dir,
            _kernel: kernel_guard,
        };
        jailed.wait_until_confined();
        jailed
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until every thread of the running VM (main, vCPU, API,
    /// spawner) is there and under its filter.
    fn wait_until_confined(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let statuses = thread_statuses(self.pid());
            if statuses.len() >= 4 && statuses.iter().all(|(_, s)| field(s, "Seccomp") == "2") {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the VMM exited with {status}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "the VMM's threads were not all confined within 30 s: {statuses:?}"
            );
            std::thread::yield_now();
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
}

/// (thread name, /proc status text) of every thread of `pid` but KVM's
/// own: the kernel's NX huge page recovery worker, made with the VM, is
/// listed among the process's tasks but runs no VMM code.
fn thread_statuses(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let name = field(&status, "Name").to_owned();
            (!name.starts_with("kvm-nx-lpage")).then_some((name, status))
        })
        .collect()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// One request line, with `file`'s fd passed alongside if given.
fn ask(api: &Path, request: &str, file: Option<&std::fs::File>) -> serde_json::Value {
    let stream = UnixStream::connect(api).unwrap();
    let line = format!("{request}\n");
    match file {
        Some(file) => {
            stream
                .send_with_fd(line.as_bytes(), file.as_raw_fd())
                .unwrap();
        }
        None => (&stream).write_all(line.as_bytes()).unwrap(),
    }
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_jailed_vmm_runs_confined_takes_disks_as_fds_and_dies_on_a_forbidden_call() {
    require_kvm();
    let mut vmm = Jailed::start();
    let pid = vmm.pid();

    // Every thread: its filter, no new privileges, no capabilities, the
    // jail's uid and gid.
    let statuses = thread_statuses(pid);
    let names: Vec<&str> = statuses.iter().map(|(name, _)| name.as_str()).collect();
    for wanted in ["vmrun-vmm", "vcpu0", "api", "spawner"] {
        assert!(names.contains(&wanted), "no {wanted} thread in {names:?}");
    }
    for (name, status) in &statuses {
        assert_eq!(field(status, "Seccomp"), "2", "{name}");
        assert_eq!(field(status, "NoNewPrivs"), "1", "{name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(status, set), "0000000000000000", "{name} {set}");
        }
        let uid = JAIL_UID.to_string();
        assert!(
            field(status, "Uid").split_whitespace().all(|id| id == uid),
            "{name}: Uid {}",
            field(status, "Uid")
        );
        assert!(
            field(status, "Gid").split_whitespace().all(|id| id == uid),
            "{name}: Gid {}",
            field(status, "Gid")
        );
    }

    // Its own mount namespace, whose root holds only the jail directory.
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let vmm_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(own_ns, vmm_ns, "the VMM shares the host's mount namespace");
    let mut in_root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_root.sort();
    assert_eq!(
        in_root,
        ["api.sock", "console.log", "vsock.sock"],
        "the jail's root"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    assert_eq!(mounts.lines().count(), 1, "mounts in the jail: {mounts}");
    assert!(
        mounts.contains(" / ") && mounts.contains("ro,nosuid,nodev,noexec"),
        "{mounts}"
    );

    // The control socket serves; a host path is out of the jail's reach,
    // an fd passed with the request is attached.
    let status = ask(&vmm.api(), r#"{"action":"status"}"#, None);
    assert_eq!(status["ok"], true, "{status}");
    let (_disk_guard, disk) = temp_file(&[0u8; 4096]);
    let by_path = ask(
        &vmm.api(),
        &format!(
            r#"{{"action":"attach_disk","path":"{}","read_only":true}}"#,
            disk.display()
        ),
        None,
    );
    if by_path.is_null() {
        let status = vmm.child.wait().unwrap();
        panic!(
            "no reply to attach_disk: the VMM ended with {status}: {}",
            vmm.stderr()
        );
    }
    assert_eq!(by_path["ok"], false, "{by_path}");
    assert!(
        by_path["error"]
            .as_str()
            .is_some_and(|e| e.contains("opens no paths")),
        "{by_path}"
    );
    let file = std::fs::File::open(&disk).unwrap();
    let by_fd = ask(
        &vmm.api(),
        &format!(
            r#"{{"action":"attach_disk","path":"{}","read_only":true}}"#,
            disk.display()
        ),
        Some(&file),
    );
    assert_eq!(by_fd, serde_json::json!({"ok": true, "disk": 0}));

    // The test hook: the API thread makes a call outside its filter.
    let stream = UnixStream::connect(vmm.api()).unwrap();
    (&stream)
        .write_all(b"{\"action\":\"test_forbidden_syscall\"}\n")
        .unwrap();
    let status = vmm.child.wait().unwrap();
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(159), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the api thread made system call {}, which its filter forbids",
            libc::SYS_getppid
        )),
        "{stderr}"
    );
}

#[test]
fn seccomp_off_is_unconfined_and_the_hook_says_so() {
    require_kvm();
    let (_kernel_guard, kernel) = temp_file(&support::elf_image(SPIN, true));
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrun-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--console", "off", "--seccomp", "off"])
        .arg("--api")
        .arg(&api)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < deadline, "no control socket");
        assert!(child.try_wait().unwrap().is_none(), "the VMM exited");
        std::thread::yield_now();
    }
    let reply = ask(&api, r#"{"action":"test_forbidden_syscall"}"#, None);
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("without seccomp")),
        "{reply}"
    );
    for (name, status) in thread_statuses(child.id()) {
        assert_eq!(field(&status, "Seccomp"), "0", "{name}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
