//! Running the `vmrun` binary in tests: isolated state directories, manifests
//! written to temp files, and leak checks (processes, mounts, cgroups).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's `vmrun` binary, built once per test process.
pub fn vmrun_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_vmrun(false))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds `vmrun`, `vmrun-supervisor`, `vmrun-procview`, `vmrun-cri-shim`, `vmrun-wasm` and `vmrun-vmm`
/// (`run -d`, the /proc view, `serve` and the vm runtime spawn them from beside `vmrun`). Inside the nested L1 guest the host has built them already:
/// cargo under emulation would only spend minutes finding nothing to do.
fn build_vmrun(release: bool) -> PathBuf {
    let workspace = workspace();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("vmrun");
    if crate::nested::inside_l1() && bin.is_file() {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--bin` selects targets across every `-p`, so each binary is named.
    cmd.args(["build", "--quiet", "-p", "vmrun", "--bin", "vmrun"])
        .args(["-p", "vmrun-supervisor", "--bin", "vmrun-supervisor"])
        .args(["-p", "vmrun-procview", "--bin", "vmrun-procview"])
        .args(["-p", "vmrun-wasm", "--bin", "vmrun-wasm"])
        .args(["-p", "vmrun-cri", "--bin", "vmrun-cri-shim"])
        .args(["-p", "vmrun-vmm", "--bin", "vmrun-vmm"])
        .current_dir(&workspace);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build for vmrun");
    assert!(status.success(), "building the vmrun binary failed");
    bin
}

/// The vm runtime's guest: kernel and agent initramfs.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

const GUEST_KERNEL_ENV: &str = "VMRUN_TEST_GUEST_KERNEL";
const GUEST_INITRAMFS_ENV: &str = "VMRUN_TEST_GUEST_INITRAMFS";

/// Builds (or finds cached) the guest with `scripts/build-guest`, once per
/// process; the paths are forwarded to runs inside the nested L1 guest.
pub fn guest_assets() -> &'static GuestAssets {
    static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        if let (Some(kernel), Some(initramfs)) = (
            std::env::var_os(GUEST_KERNEL_ENV),
            std::env::var_os(GUEST_INITRAMFS_ENV),
        ) {
            return GuestAssets {
                kernel: kernel.into(),
                initramfs: initramfs.into(),
            };
        }
        let out = Command::new(workspace().join("scripts/build-guest"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/build-guest");
        assert!(out.status.success(), "scripts/build-guest failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let paths: serde_json::Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("scripts/build-guest printed {last:?}: {e}"));
        let assets = GuestAssets {
            kernel: paths["kernel"].as_str().expect("kernel path").into(),
            initramfs: paths["initramfs"].as_str().expect("initramfs path").into(),
        };
        crate::nested::forward_env(GUEST_KERNEL_ENV, &assets.kernel);
        crate::nested::forward_env(GUEST_INITRAMFS_ENV, &assets.initramfs);
        assets
    })
}

/// Image store shared by every test of this process, so layers unpack once.
pub fn shared_image_root() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("vmrun-test-images")
            .tempdir()
            .expect("temp dir")
    })
    .path()
}

/// Fails loudly unless running as root: the end-to-end tests need namespaces,
/// mounts and cgroups, and CI runs them as root.
pub fn require_root(test: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test}: needs root (namespaces, mounts, cgroups); run the suite as root"
    );
}

/// One isolated vmrun installation: its own pod state directory.
pub struct Vmrun {
    pub state: tempfile::TempDir,
    pub config: PathBuf,
}

impl Vmrun {
    /// Puts this installation's `vmrun run` pods on the CNI network
    /// `conflist` (`[network] cni_conf_dir` in its configuration).
    pub fn use_cni_network(&self, conflist: &str) {
        let conf_dir = self.state.path().join("cni");
        std::fs::create_dir_all(&conf_dir).expect("cni dir");
        std::fs::write(conf_dir.join("10-run.conflist"), conflist).expect("conflist");
        let mut config = std::fs::read_to_string(&self.config).expect("config");
        config += &format!("[network]\ncni_conf_dir = {conf_dir:?}\n");
        std::fs::write(&self.config, config).expect("config");
    }

    /// SIGKILLs the supervisor of the detached pod `pod` (whose `record` is
    /// given), waits until it is gone, and checks `vmrun ps` says so.
    pub fn kill_supervisor(&self, pod: &str, record: &serde_json::Value) {
        let supervisor = record["supervisor_pid"].as_i64().expect("supervisor pid") as i32;
        let pidfd = vmrun_pod::native::pidfd_open(supervisor).expect("supervisor pidfd");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("SIGKILL the supervisor");
        assert!(
            vmrun_pod::native::poll_exit(&pidfd, Some(Duration::from_secs(10))).unwrap(),
            "the supervisor {supervisor} outlived SIGKILL"
        );
        let ps = self.run(&["ps"]);
        assert!(
            text(&ps.stdout)
                .lines()
                .any(|l| l.contains(pod) && l.contains("supervisor gone")),
            "{}",
            describe(&ps)
        );
    }

    pub fn new() -> Self {
        Self::for_runtime("native")
    }

    /// An installation whose config points the vm runtime at the test guest.
    pub fn for_runtime(runtime: &str) -> Self {
        let state = tempfile::Builder::new()
            .prefix("vmrun-test-state")
            .tempdir()
            .expect("temp dir");
        let config = state.path().join("config.toml");
        let mut text = "pids_limit = 1024\n".to_string();
        if runtime == "vm" {
            let guest = guest_assets();
            text += &format!(
                "[vm]\nkernel = {:?}\ninitramfs = {:?}\n",
                guest.kernel, guest.initramfs
            );
            if crate::nested::inside_l1() {
                // QEMU TCG's nested SVM now and then triple-faults a second
                // vCPU while it starts (seen in about 1 of 8 two-vCPU pod
                // boots, never with one). Pod VMs in the nested setup get one
                // vCPU; the VMM's own tests still boot two (vmm_guest.rs,
                // nested_boot.rs).
                text += "max_vcpus = 1\n";
            }
        }
        std::fs::write(&config, text).expect("config");
        Self { state, config }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(vmrun_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(shared_image_root())
            .arg("--state")
            .arg(self.state.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `vmrun ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running vmrun")
    }

    /// Writes a manifest into the state dir and returns its path.
    pub fn manifest(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.state.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("writing manifest");
        path
    }

    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.state.path().join("pods").join(pod)
    }

    /// The pod record as JSON (`pods/<name>/pod.json`).
    pub fn record(&self, pod: &str) -> Option<serde_json::Value> {
        let text = std::fs::read(self.pod_dir(pod).join("pod.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Polls the pod record until `ready` holds, up to `timeout`.
    pub fn wait_record(
        &self,
        pod: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.record(pod) {
                if ready(&r) {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pod {pod}: record never reached the expected state: {:?}",
                self.record(pod)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The VMM processes of pod `pod` (the vm runtime names its files under
    /// the pod's directory on the VMM's command line).
    pub fn vmm_pids(&self, pod: &str) -> Vec<i32> {
        vmms_under(&self.pod_dir(pod))
    }

    /// (name, /proc status) of each thread of process `pid`.
    pub fn thread_statuses(pid: i32) -> Vec<(String, String)> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|task| {
                let status = std::fs::read_to_string(task.path().join("status")).ok()?;
                Some((status_field(&status, "Name").to_owned(), status))
            })
            .collect()
    }

    /// Every leftover of a pod with this uid: host mounts below the state dir,
    /// cgroup directories, live processes whose command line contains `marker`.
    pub fn leftovers(&self, uid: &str, marker: &str) -> Vec<String> {
        let mut found = Vec::new();
        let state = self.state.path().to_string_lossy().into_owned();
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            if line.contains(&state) {
                found.push(format!("mount: {line}"));
            }
        }
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path().join("vmrun").join(uid);
            if dir.exists() {
                found.push(format!("cgroup: {}", dir.display()));
            }
        }
        let vmms = vmms_under(self.state.path());
        for (pid, text) in processes() {
            if vmms.contains(&pid) || (!marker.is_empty() && text.contains(marker)) {
                found.push(format!("process {pid}: {text}"));
            }
        }
        found
    }
}

/// Every process as (pid, command line with NULs as spaces).
/// The VMM processes of pods under `dir` (a pod's or a whole state
/// directory): a pod's VMM works in, and is jailed in, its VM directory,
/// which it holds open as fd 3 from the host's side.
pub fn vmms_under(dir: &Path) -> Vec<i32> {
    processes()
        .filter(|(pid, cmdline)| {
            cmdline.contains("vmrun-vmm")
                && std::fs::read_link(format!("/proc/{pid}/fd/3"))
                    .is_ok_and(|held| held.starts_with(dir))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// One field of a /proc status file, trimmed ("" if absent).
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

fn processes() -> impl Iterator<Item = (i32, String)> {
    process_table().into_iter().map(|(pid, _, cmd)| (pid, cmd))
}

/// Every process as (pid, parent pid, command line with NULs as spaces).
pub fn process_table() -> Vec<(i32, i32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|proc| {
            let pid: i32 = proc.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(proc.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(proc.path().join("cmdline")).unwrap_or_default();
            Some((
                pid,
                ppid,
                String::from_utf8_lossy(&cmdline).replace('\0', " "),
            ))
        })
        .collect()
}

impl Default for Vmrun {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes of a command's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The pod uid of a pod record.
pub fn uid_of(record: &serde_json::Value) -> String {
    record["uid"].as_str().expect("uid").to_string()
}

/// `vmrun` refused the pod: it failed without panicking, its stderr names
/// every one of `needles`, and the pod's directory is gone.
pub fn assert_refused(vm: &Vmrun, out: &Output, pod: &str, needles: &[&str]) {
    assert!(!out.status.success(), "{}", describe(out));
    let stderr = text(&out.stderr);
    assert!(
        needles.iter().all(|n| stderr.contains(n)),
        "stderr does not name all of {needles:?}: {}",
        describe(out)
    );
    assert!(!stderr.contains("panicked"), "{}", describe(out));
    assert!(!vm.pod_dir(pod).exists(), "pod directory left behind");
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The workspace's release `vmrun` binary (benchmarks), built once.
pub fn vmrun_release_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_vmrun(true))
}

/// Runs one of the crate's async image pushes to completion, for synchronous tests.
fn pushed(what: &str, push: impl std::future::Future<Output = anyhow::Result<String>>) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(push)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// [`crate::shared_procps_image`], for synchronous tests.
pub fn procps_reference() -> String {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE
        .get_or_init(|| {
            pushed(
                "pushing the procps test image",
                crate::shared_procps_image(),
            )
        })
        .clone()
}

/// `127.0.0.1:PORT/test/busybox:latest` in the process-wide test registry.
pub fn busybox_reference() -> String {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE
        .get_or_init(|| {
            pushed(
                "starting the test registry with busybox",
                crate::shared_busybox(),
            )
        })
        .clone()
}
