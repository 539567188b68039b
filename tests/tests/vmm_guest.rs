//! Our VMM with a real Linux guest whose init is `vmrun-guest-check`
//! (`tests/guest-check`): virtio-blk read and written by the guest and checked
//! on the host, vsock in both directions through the hybrid socket, a guest
//! panic reported as a failure, and nothing left behind. All four scenarios
//! run in the nested L1 guest where the host has no hardware KVM. One vCPU:
//! `nested_boot.rs` shows two; here a second vCPU would only add exposure to
//! QEMU TCG's nested-SVM flakiness (docs/vm-runtime.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use vmrun_tests::nested_cpio::Cpio;
use vmrun_tests::nested_vmm::{guest_kernel_dir, vmm_bin};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
const GUEST_CHECK_ENV: &str = "VMRUN_TEST_GUEST_CHECK";
const LINE_TIMEOUT: Duration = Duration::from_secs(300);

/// The static guest-check binary, built on the host (musl) and forwarded into L1.
fn guest_check_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(GUEST_CHECK_ENV) {
            return bin.into();
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target = "x86_64-unknown-linux-musl";
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--release", "-p", "vmrun-guest-check"])
            .args(["--target", target])
            .current_dir(&workspace)
            .status()
            .expect("cargo build of vmrun-guest-check");
        assert!(
            status.success(),
            "building vmrun-guest-check for {target} failed"
        );
        let bin = workspace
            .join("target")
            .join(target)
            .join("release/vmrun-guest-check")
            .canonicalize()
            .expect("the built vmrun-guest-check");
        vmrun_tests::nested::forward_env(GUEST_CHECK_ENV, &bin);
        bin
    })
}

fn initramfs(dir: &Path) -> PathBuf {
    let init = std::fs::read(guest_check_bin()).expect("reading vmrun-guest-check");
    let mut cpio = Cpio::new();
    cpio.dir("/dev")
        .dir("/proc")
        .dir("/sys")
        .char_device("/dev/console", 0o600, 5, 1)
        .file("/init", 0o755, &init);
    let path = dir.join("check.cpio");
    std::fs::write(&path, cpio.finish()).expect("writing the initramfs");
    path
}

/// A running VMM whose console lines arrive on a channel.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    console: Vec<String>,
}

impl Guest {
    fn start(dir: &Path, cmdline_extra: &str, extra_args: &[&str]) -> Guest {
        let kernel = guest_kernel_dir().join("vmlinux");
        let mut child = Command::new(vmm_bin())
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initramfs(dir))
            .args(["--cmdline", &format!("{CMDLINE} {cmdline_extra}")])
            .args(["--vcpus", "1", "--memory", "256", "--console", "stdio"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmrun-vmm");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines,
            console: Vec::new(),
        }
    }

    /// Waits for a console line starting with `prefix`; returns its rest.
    fn expect(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(LINE_TIMEOUT) {
                Ok(line) => {
                    self.console.push(line.clone());
                    if let Some(rest) = line.trim_end_matches('\r').strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let mut stderr = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = e.read_to_string(&mut stderr);
                    }
                    panic!(
                        "no console line {prefix:?}; console:\n{}\nVMM stderr:\n{stderr}",
                        self.console.join("\n")
                    );
                }
            }
        }
    }

    /// Waits for the VMM to exit; returns its code and stderr.
    fn finish(mut self) -> (Option<i32>, String, Vec<String>) {
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = self.child.wait().expect("waiting for vmrun-vmm");
        self.console.extend(self.lines.try_iter());
        (status.code(), stderr, self.console)
    }
}

fn prepare() {
    guest_kernel_dir();
    vmm_bin();
    guest_check_bin();
}

#[test]
fn guest_sees_cpus_memory_and_writes_the_disk() {
    prepare();
    vmrun_tests::hardware_kvm_or_nested!("guest_sees_cpus_memory_and_writes_the_disk");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..20].copy_from_slice(b"hello from the host\n");
    std::fs::write(&disk, &image).unwrap();
    let disk_arg = disk.display().to_string();
    let mut guest = Guest::start(dir.path(), "check.disk", &["--disk", &disk_arg]);
    assert_eq!(guest.expect("CHECK cpus="), "1");
    let mem_kib: u64 = guest.expect("CHECK mem_kib=").parse().unwrap();
    assert!(
        (200 * 1024..=256 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB for 256 MiB"
    );
    assert_eq!(guest.expect("CHECK disk_read="), "hello from the host");
    guest.expect("CHECK disk_written=1");
    guest.expect("CHECK done=1");
    let (code, stderr, console) = guest.finish();
    assert_eq!(code, Some(0), "vmrun-vmm: {stderr}\n{}", console.join("\n"));
    let mut written = [0u8; 21];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut written, 4096)
        .unwrap();
    assert_eq!(&written, b"written by the guest\n");
}

#[test]
fn vsock_both_directions_and_the_socket_is_removed() {
    prepare();
    vmrun_tests::hardware_kvm_or_nested!("vsock_both_directions_and_the_socket_is_removed");
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("v.sock");
    // Guest-initiated: the VMM connects a guest connect to port 5000 to `<vsock>_5000`.
    let host_listener = UnixListener::bind(format!("{}_5000", vsock.display())).unwrap();
    let served = std::thread::spawn(move || {
        let (mut conn, _) = host_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        conn.write_all(b"hello guest\n").unwrap();
        line
    });
    let vsock_arg = vsock.display().to_string();
    let mut guest = Guest::start(
        dir.path(),
        "check.listen=6000 check.connect=5000",
        &["--vsock", &vsock_arg],
    );
    guest.expect("CHECK listening=6000");
    // Host-initiated: CONNECT through the hybrid socket to the guest's listener.
    let mut conn = UnixStream::connect(&vsock).unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "CONNECT reply {ok:?}");
    conn.write_all(b"ping\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "echo: ping\n");
    assert_eq!(guest.expect("CHECK listen_got="), "ping");
    assert_eq!(guest.expect("CHECK connect_reply="), "hello guest");
    assert_eq!(served.join().unwrap(), "hello from the guest\n");
    guest.expect("CHECK done=1");
    let (code, stderr, console) = guest.finish();
    assert_eq!(code, Some(0), "vmrun-vmm: {stderr}\n{}", console.join("\n"));
    assert!(!vsock.exists(), "the VMM left its vsock socket behind");
}

/// The real guest: our kernel with `vmrun-agent` as PID 1. Boot to the first
/// vsock round trip (`Health`), what the agent reports, memory the guest
/// freed coming back to the host through free page reporting (the balloon's
/// count in the control API's status), then `Shutdown`: a clean power-off,
/// VMM exit 0, sockets gone.
#[test]
fn agent_boots_answers_health_and_powers_off_cleanly() {
    let guest = vmrun_tests::pod::guest_assets().clone();
    vmm_bin();
    vmrun_tests::hardware_kvm_or_nested!("agent_boots_answers_health_and_powers_off_cleanly");
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("agent.sock");
    let api = dir.path().join("api.sock");
    let started = std::time::Instant::now();
    let mut child = Command::new(vmm_bin())
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initramfs)
        .args(["--cmdline", CMDLINE])
        .args(["--vcpus", "1", "--memory", "256", "--console", "off"])
        .arg("--vsock")
        .arg(&vsock)
        .arg("--api")
        .arg(&api)
        .arg("--free-page-reporting")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmrun-vmm");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut reclaimed = None;
    let (health, ready) = rt.block_on(async {
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the VMM exited before the agent answered"
            );
            assert!(
                started.elapsed() < LINE_TIMEOUT,
                "no agent after {LINE_TIMEOUT:?}"
            );
            if let Ok(mut agent) =
                vmrun_proto::connect_hybrid_vsock(&vsock, vmrun_proto::AGENT_VSOCK_PORT).await
            {
                if let Ok(health) = agent.health(vmrun_proto::v1::HealthRequest {}).await {
                    let ready = started.elapsed();
                    reclaimed = Some(wait_for_reclaim(&api, &mut child, started).await);
                    agent
                        .shutdown(vmrun_proto::v1::ShutdownRequest {})
                        .await
                        .expect("Shutdown");
                    return (health.into_inner(), ready);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "vmrun-vmm after Shutdown: {stderr}");
    assert_eq!(health.protocol_version, vmrun_proto::PROTOCOL_VERSION);
    assert_eq!(health.num_cpus, 1);
    assert!(
        (200u64 << 20..=256u64 << 20).contains(&health.mem_total_bytes),
        "MemTotal {} for 256 MiB",
        health.mem_total_bytes
    );
    let host_release = nix::sys::utsname::uname().unwrap();
    assert_ne!(
        health.kernel_release,
        host_release.release().to_string_lossy(),
        "the guest runs its own kernel"
    );
    assert!(health.boot_timestamp_ns > 0);
    assert!(!vsock.exists(), "the VMM left its vsock socket behind");
    assert!(!api.exists(), "the VMM left its control socket behind");
    let reclaimed = reclaimed.expect("measured before the shutdown");
    println!(
        "boot to agent-ready {:.2}s (guest kernel {}, agent started {:.2}s after guest boot); \
         free page reporting gave back {} MiB within {:.1}s of agent-ready (VMM RSS {} -> {} MiB)",
        ready.as_secs_f64(),
        health.kernel_release,
        health.boot_timestamp_ns as f64 / 1e9,
        reclaimed.bytes >> 20,
        (reclaimed.after - ready).as_secs_f64(),
        reclaimed.rss_before_kib >> 10,
        reclaimed.rss_after_kib >> 10,
    );
}

struct Reclaimed {
    bytes: u64,
    after: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

/// Polls the control API until the balloon has taken back at least half the
/// guest's 256 MiB: an idle guest has ~200 MiB free, which its kernel reports
/// in 4 MiB blocks, a batch every couple of seconds. (Most of it was never
/// touched; the host RSS this saves is measured by `benches/` vm_pod_start.)
async fn wait_for_reclaim(api: &Path, child: &mut Child, started: std::time::Instant) -> Reclaimed {
    const EXPECTED: u64 = 128 << 20;
    let rss_before_kib = rss_kib(child.id());
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the VMM exited while waiting for free page reports"
        );
        let status = api_status(api);
        let bytes = status["balloon"]["discarded_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no balloon in the VMM's status: {status}"));
        assert_eq!(
            status["balloon"]["rejected_ranges"], 0,
            "the guest reported ranges the device refused: {status}"
        );
        if bytes >= EXPECTED {
            return Reclaimed {
                bytes,
                after: started.elapsed(),
                rss_before_kib,
                rss_after_kib: rss_kib(child.id()),
            };
        }
        assert!(
            started.elapsed() < LINE_TIMEOUT,
            "the guest gave back only {bytes} bytes after {LINE_TIMEOUT:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn api_status(api: &Path) -> serde_json::Value {
    let mut stream = UnixStream::connect(api).expect("connecting to the control API");
    stream
        .write_all(b"{\"action\":\"status\"}\n")
        .expect("sending status");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("reading the status reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("status reply {line:?}: {e}"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn guest_panic_is_a_failure_with_the_panic_line() {
    prepare();
    vmrun_tests::hardware_kvm_or_nested!("guest_panic_is_a_failure_with_the_panic_line");
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Guest::start(dir.path(), "check.panic", &[]);
    guest.expect("CHECK panicking=1");
    let (code, stderr, console) = guest.finish();
    assert_ne!(code, Some(0), "a panicked guest must fail: {stderr}");
    assert!(
        stderr.contains("Kernel panic") && stderr.contains("Attempted to kill init"),
        "stderr should quote the panic line: {stderr}\n{}",
        console.join("\n")
    );
}
