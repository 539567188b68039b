//! Booting real Linux guests (L2 when nested) with `vmrun-vmm` or QEMU's microvm, and timing
//! them: the binaries and kernels they need, a tiny probe initramfs, and a runner that
//! measures the wall time from spawning the VMM to a marker on the guest's console.
//!
//! The preparation steps ([`vmm_bin`], [`guest_kernel_dir`]) run on the host before a test
//! goes nested and pass their results into L1 (see [`crate::nested::forward_env`]), so the
//! run inside L1 neither builds nor rebuilds anything.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::nested::forward_env;
use crate::nested_cpio::Cpio;
use crate::nested_l1::static_busybox;

const VMM_BIN_ENV: &str = "VMRUN_VMM_BIN";
const GUEST_KERNEL_DIR_ENV: &str = "VMRUN_GUEST_KERNEL_DIR";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `target/debug/vmrun-vmm`, built once per test process (or `$VMRUN_VMM_BIN`).
pub fn vmm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = match std::env::var_os(VMM_BIN_ENV) {
            Some(bin) => PathBuf::from(bin),
            None => build_vmm(),
        };
        forward_env(VMM_BIN_ENV, &bin);
        bin
    })
}

fn build_vmm() -> PathBuf {
    let workspace = workspace();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "vmrun-vmm", "--bin", "vmrun-vmm"])
        .current_dir(&workspace)
        .status()
        .expect("running cargo build for vmrun-vmm");
    assert!(status.success(), "building the vmrun-vmm binary failed");
    target.join("debug").join("vmrun-vmm")
}

/// The guest kernel cache directory (`vmlinux`, `bzImage`) from `kernels/build.sh`, which
/// builds the kernel first if needed (or `$VMRUN_GUEST_KERNEL_DIR`).
pub fn guest_kernel_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = match std::env::var_os(GUEST_KERNEL_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => build_guest_kernel(),
        };
        forward_env(GUEST_KERNEL_DIR_ENV, &dir);
        dir
    })
}

fn build_guest_kernel() -> PathBuf {
    let script = workspace().join("kernels/build.sh");
    crate::nested::progress("kernels/build.sh: building or finding the guest kernel");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}",
        script.display(),
        out.status
    );
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        dir.join("vmlinux").is_file() && dir.join("bzImage").is_file(),
        "{} printed {} as its cache dir, which lacks vmlinux and bzImage",
        script.display(),
        dir.display()
    );
    dir
}

/// A busybox initramfs whose `/init` prints `marker`, then `cpus=<N>` (processors in
/// `/proc/cpuinfo`: the CPUs that came up), `present=<list>` (the CPUs the firmware
/// tables describe, `/sys/devices/system/cpu/present`), then `MemTotal:` from
/// `/proc/meminfo`, then reboots at once.
pub fn probe_initramfs(marker: &str) -> anyhow::Result<Vec<u8>> {
    ensure!(
        !marker.contains(['\'', '\n']),
        "the marker must not contain quotes or newlines"
    );
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         echo '{marker}'\n\
         echo \"cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)\"\n\
         echo \"present=$(/bin/busybox cat /sys/devices/system/cpu/present)\"\n\
         /bin/busybox grep MemTotal: /proc/meminfo\n\
         echo \"uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n\
         /bin/busybox reboot -f\n"
    );
    let busybox = static_busybox()?;
    let mut cpio = Cpio::new();
    cpio.dir("/bin")
        .dir("/dev")
        .dir("/proc")
        .dir("/sys")
        .char_device("/dev/console", 0o600, 5, 1)
        .file("/bin/busybox", 0o755, &busybox)
        .symlink("/bin/sh", "busybox")
        .file("/init", 0o755, init.as_bytes());
    Ok(cpio.finish())
}

/// A `vmrun-vmm` invocation with the console on stdout.
pub fn vmm_command(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    memory_mib: u64,
) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel").arg(kernel);
    if let Some(initrd) = initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    cmd.args(["--cmdline", cmdline])
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--memory", &memory_mib.to_string()])
        .args(["--console", "stdio"]);
    cmd
}

/// The same guest in QEMU's microvm machine on KVM, for comparisons: console on stdout,
/// no devices beyond the serial port. microvm has no i8042 to reset through, so `reboot=t`
/// is appended: a guest reboot triple-faults and `-no-reboot` makes QEMU exit.
pub fn qemu_microvm_command(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    memory_mib: u64,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on"])
        .args(["-enable-kvm", "-cpu", "host", "-no-reboot"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .args(["-smp", &vcpus.to_string(), "-m", &format!("{memory_mib}M")])
        .arg("-kernel")
        .arg(kernel);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.args(["-append", &format!("{cmdline} reboot=t")]);
    cmd
}

/// One guest boot, timed from spawning its VMM.
#[derive(Debug)]
pub struct TimedBoot {
    /// When the marker first appeared on the console (`None`: it never did).
    pub to_marker: Option<Duration>,
    /// Until the VMM exited.
    pub total: Duration,
    pub status: ExitStatus,
    /// Everything the VMM wrote on stdout (the console) and stderr.
    pub console: String,
    pub stderr: String,
}

impl TimedBoot {
    /// For assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {}, marker after {:?}, total {:?}\n--- console\n{}\n--- stderr\n{}",
            self.status, self.to_marker, self.total, self.console, self.stderr
        )
    }
}

/// Runs `cmd` (a VMM whose stdout is the guest console) to its exit, noting when `marker`
/// first shows on the console. Kills it after `timeout`.
pub fn time_boot(mut cmd: Command, marker: &str, timeout: Duration) -> anyhow::Result<TimedBoot> {
    let program: OsString = cmd.get_program().to_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let (sender, chunks) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || sender.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });

    let deadline = start + timeout;
    let mut console = Vec::new();
    let mut to_marker = None;
    let status = loop {
        match chunks.recv_timeout(Duration::from_millis(20)) {
            Ok((at, chunk)) => {
                console.extend_from_slice(&chunk);
                if to_marker.is_none()
                    && console
                        .windows(marker.len())
                        .any(|w| w == marker.as_bytes())
                {
                    to_marker = Some(at - start);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stdout closed: the VMM is exiting.
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not exit within {timeout:?}; console so far:\n{}",
                program.to_string_lossy(),
                String::from_utf8_lossy(&console)
            );
        }
    };
    let total = start.elapsed();
    let _ = reader.join();
    while let Ok((at, chunk)) = chunks.try_recv() {
        console.extend_from_slice(&chunk);
        if to_marker.is_none()
            && console
                .windows(marker.len())
                .any(|w| w == marker.as_bytes())
        {
            to_marker = Some(at - start);
        }
    }
    let stderr = stderr_reader.join().unwrap_or_default();
    Ok(TimedBoot {
        to_marker,
        total,
        status,
        console: String::from_utf8_lossy(&console).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// What to boot in a comparison: the same guest for every VMM.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Printed by the guest once it is up (e.g. by its init); the time to it is measured.
    pub marker: String,
}

/// Times `runs` boots of `guest` with `vmrun-vmm` and with QEMU microvm, alternating.
/// Needs hardware-style KVM: call it on such a host or inside L1 (e.g. from a benchmark
/// binary that re-ran itself there with [`crate::nested::rerun_self_inside_l1`]). Fails if a
/// boot fails or never shows the marker.
pub fn compare_vmm_with_qemu(
    guest: &GuestSpec,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<(TimedBoot, TimedBoot)>> {
    let mut results = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut pair = Vec::with_capacity(2);
        for qemu in [false, true] {
            let build = if qemu {
                qemu_microvm_command
            } else {
                vmm_command
            };
            let cmd = build(
                &guest.kernel,
                guest.initrd.as_deref(),
                &guest.cmdline,
                guest.vcpus,
                guest.memory_mib,
            );
            let boot = time_boot(cmd, &guest.marker, timeout)?;
            let name = if qemu { "QEMU microvm" } else { "vmrun-vmm" };
            ensure!(
                boot.to_marker.is_some() && boot.status.success(),
                "{name} did not boot {}: {}",
                guest.kernel.display(),
                boot.describe()
            );
            pair.push(boot);
        }
        let qemu = pair.pop().expect("two boots");
        let vmm = pair.pop().expect("two boots");
        results.push((vmm, qemu));
    }
    Ok(results)
}
