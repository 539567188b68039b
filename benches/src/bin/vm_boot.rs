//! MicroVM boot to agent-ready: `vmrun-vmm` beside `qemu-system-x86_64 -M
//! microvm`, the same guest kernel and agent initramfs, the same run.
//!
//! Boot to agent-ready is the time from spawning the VMM to the first
//! successful vsock round trip (the agent's `Health`). VMM overhead is the
//! VMM process's RSS excluding the guest-memory mapping, read from
//! `/proc/<pid>/smaps` once the agent has answered.
//!
//! `cargo run --release -p vmrun-benches --bin vm_boot -- [RUNS]` (as root).
//! Where `/dev/kvm` is not hardware KVM (a `kvm_pvm` host), the measurement
//! runs inside the nested QEMU TCG setup of `vmrun_tests::nested` and says
//! so: those numbers compare the two VMMs, they are not absolute boot times.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmrun_benches::{ms, summarize};

const INSIDE_FLAG: &str = "--measure";
const GUEST_MEMORY_MIB: u64 = 256;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet printk.devkmsg=on";
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(1);
/// Pairs of boots per nested L1.
const NESTED_BATCH: usize = 10;
/// The line of the nested run's stdout that carries its samples to the host.
const RESULT_PREFIX: &str = "vm_boot samples: ";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(INSIDE_FLAG) {
        let runs = args[2].parse()?;
        let assets = Assets {
            vmm: PathBuf::from(&args[3]),
            kernel: PathBuf::from(&args[4]),
            initramfs: PathBuf::from(&args[5]),
        };
        let samples = measure(&assets, runs)?;
        println!("{RESULT_PREFIX}{}", samples.to_json());
        return Ok(());
    }
    let runs: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let assets = Assets::build()?;
    let exe = std::env::current_exe()?;
    let measure_args = [
        INSIDE_FLAG.to_string(),
        runs.to_string(),
        assets.vmm.display().to_string(),
        assets.kernel.display().to_string(),
        assets.initramfs.display().to_string(),
    ];
    if vmrun_tests::nested::needs_nesting() {
        let where_ =
            "nested: QEMU TCG L1 (-cpu EPYC,+svm,+npt), Debian cloud kernel with kvm-amd; \
                      this host's /dev/kvm is kvm_pvm";
        // One L1 for all 30 pairs of boots wedged (4 of 4 tries): L1 goes
        // silent after ~15 pairs. Batches keep each L1 short, as the nested
        // pod tests do.
        let mut all = Samples::default();
        let mut done = 0;
        while done < runs {
            let batch = NESTED_BATCH.min(runs - done);
            eprintln!(
                "vm_boot: boots {}..{} of {runs} in a fresh L1",
                done + 1,
                done + batch
            );
            let out = vmrun_tests::nested::Command::new(&exe)
                .args([INSIDE_FLAG.to_string(), batch.to_string()])
                .args(&measure_args[2..])
                // So the run inside knows it is nested (and may leave out
                // boots the emulator breaks).
                .env(vmrun_tests::nested::INSIDE_ENV, "1")
                // About 30 s per pair of boots in the nested setup.
                .timeout(Duration::from_secs(120 + 40 * batch as u64))
                .echo(true)
                .output()?;
            if !out.output.status.success() {
                bail!("the nested measurement failed: {}", out.output.status);
            }
            let stdout = String::from_utf8_lossy(&out.output.stdout);
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix(RESULT_PREFIX))
                .context("the nested run printed no samples")?;
            all.extend(Samples::from_json(line)?);
            done += batch;
        }
        all.report(runs, where_);
        Ok(())
    } else {
        let samples = measure(&assets, runs)?;
        samples.report(runs, "hardware KVM on this host");
        Ok(())
    }
}

struct Assets {
    vmm: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
}

impl Assets {
    /// Builds (or finds cached) the release VMM, guest kernel and initramfs.
    fn build() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "vmrun-vmm"])
            .current_dir(&root)
            .status()?;
        if !status.success() {
            bail!("building vmrun-vmm failed");
        }
        let out = Command::new(root.join("scripts/build-guest"))
            .stderr(Stdio::inherit())
            .output()
            .context("scripts/build-guest")?;
        if !out.status.success() {
            bail!("scripts/build-guest failed");
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let paths: serde_json::Value = serde_json::from_str(last)
            .with_context(|| format!("scripts/build-guest printed {last:?}"))?;
        let path = |key: &str| -> anyhow::Result<PathBuf> {
            Ok(PathBuf::from(
                paths[key]
                    .as_str()
                    .with_context(|| format!("no {key} in {last}"))?,
            ))
        };
        Ok(Assets {
            vmm: root.join("target/release/vmrun-vmm").canonicalize()?,
            kernel: path("kernel")?,
            initramfs: path("initramfs")?,
        })
    }
}

struct Sample {
    ready: Duration,
    overhead_kib: u64,
}

fn measure(assets: &Assets, runs: usize) -> anyhow::Result<Samples> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let work = tempfile::Builder::new().prefix("vmrun-boot").tempdir()?;
    let mut samples = Samples::default();
    let nested = vmrun_tests::nested::inside_l1();
    // Interleaved, so drift in the machine's load hits both alike.
    for i in 0..runs {
        let a = rt.block_on(boot_vmrun(assets, work.path(), i));
        let b = rt.block_on(boot_qemu(assets, work.path(), i));
        for (result, list, count, name) in [
            (a, &mut samples.ours, &mut samples.failed.0, "vmrun-vmm"),
            (b, &mut samples.qemu, &mut samples.failed.1, "qemu"),
        ] {
            match result {
                Ok(sample) => list.push(sample),
                // Nested, QEMU TCG's SVM now and then resets a booting
                // guest (both VMMs; docs/vm-runtime.md): such a boot is
                // counted as failed, printed, and left out of the times.
                Err(e) if nested && *count < runs / 5 => {
                    *count += 1;
                    eprintln!("vm_boot: {name} boot {i} failed (not counted): {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(samples)
}

/// Boots of both VMMs, and how many failed and were left out.
#[derive(Default)]
struct Samples {
    ours: Vec<Sample>,
    qemu: Vec<Sample>,
    failed: (usize, usize),
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.ours.extend(other.ours);
        self.qemu.extend(other.qemu);
        self.failed.0 += other.failed.0;
        self.failed.1 += other.failed.1;
    }

    fn to_json(&self) -> serde_json::Value {
        let list = |samples: &[Sample]| {
            samples
                .iter()
                .map(|s| serde_json::json!([ms(s.ready), s.overhead_kib]))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "ours": list(&self.ours),
            "qemu": list(&self.qemu),
            "failed": [self.failed.0, self.failed.1],
        })
    }

    fn from_json(text: &str) -> anyhow::Result<Samples> {
        let v: serde_json::Value = serde_json::from_str(text).context("nested samples")?;
        let list = |key: &str| -> anyhow::Result<Vec<Sample>> {
            v[key]
                .as_array()
                .with_context(|| format!("no {key} in the nested samples"))?
                .iter()
                .map(|pair| {
                    let ready = pair[0]
                        .as_f64()
                        .context("a boot time that is not a number")?;
                    let overhead_kib = pair[1]
                        .as_u64()
                        .context("an overhead that is not a number")?;
                    Ok(Sample {
                        ready: Duration::from_secs_f64(ready / 1000.0),
                        overhead_kib,
                    })
                })
                .collect()
        };
        let failed = |i: usize| v["failed"][i].as_u64().unwrap_or(0) as usize;
        Ok(Samples {
            ours: list("ours")?,
            qemu: list("qemu")?,
            failed: (failed(0), failed(1)),
        })
    }

    fn report(&self, runs: usize, where_: &str) {
        let (ours, qemu, failed) = (&self.ours, &self.qemu, self.failed);
        println!(
            "microVM boot to agent-ready, {runs} boots each, 1 vCPU, {GUEST_MEMORY_MIB} MiB \
             (failed boots, left out: vmrun-vmm {}, qemu {})",
            failed.0, failed.1
        );
        println!("measured: {where_}");
        println!(
            "{:<22} {:>9} {:>9} {:>9} {:>16}",
            "vmm", "p50 ms", "p99 ms", "mean ms", "overhead MiB p50"
        );
        let row = |name: &str, samples: &[Sample]| {
            let ready: Vec<Duration> = samples.iter().map(|s| s.ready).collect();
            let s = summarize(&ready);
            let mut rss: Vec<u64> = samples.iter().map(|s| s.overhead_kib).collect();
            rss.sort();
            let rss_mib = rss[rss.len() / 2] as f64 / 1024.0;
            println!(
                "{name:<22} {:>9.1} {:>9.1} {:>9.1} {:>16.1}",
                ms(s.p50),
                ms(s.p99),
                ms(s.mean),
                rss_mib
            );
            (s, rss_mib)
        };
        let (a, a_rss) = row("vmrun-vmm", ours);
        let (b, b_rss) = row("qemu -M microvm", qemu);
        println!(
            "vmrun-vmm/qemu ratio: boot p50 {:.2}x, p99 {:.2}x, overhead {:.2}x",
            ms(a.p50) / ms(b.p50),
            ms(a.p99) / ms(b.p99),
            a_rss / b_rss
        );
    }
}

async fn boot_vmrun(assets: &Assets, work: &Path, i: usize) -> anyhow::Result<Sample> {
    let vsock = work.join(format!("vsock-{i}.sock"));
    // Both VMMs log the (quiet) guest console to a file: the same cost for
    // both, and a reason to show when a boot fails.
    let console = work.join(format!("vmrun-console-{i}.log"));
    let started = Instant::now();
    let mut child = Command::new(&assets.vmm)
        .arg("--kernel")
        .arg(&assets.kernel)
        .arg("--initrd")
        .arg(&assets.initramfs)
        .args(["--cmdline", CMDLINE, "--vcpus", "1", "--console"])
        .arg(&console)
        .args(["--memory", &GUEST_MEMORY_MIB.to_string()])
        .arg("--vsock")
        .arg(&vsock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawning vmrun-vmm")?;
    let mut agent = until_healthy(&mut child, "vmrun-vmm", started, || async {
        Ok(vmrun_proto::connect_hybrid_vsock(&vsock, vmrun_proto::AGENT_VSOCK_PORT).await?)
    })
    .await
    .with_context(|| console_tail(&console))?;
    let ready = started.elapsed();
    let overhead_kib = rss_without_guest_kib(child.id())?;
    let _ = agent.shutdown(vmrun_proto::v1::ShutdownRequest {}).await;
    wait_exit(&mut child, "vmrun-vmm")?;
    Ok(Sample {
        ready,
        overhead_kib,
    })
}

async fn boot_qemu(assets: &Assets, work: &Path, i: usize) -> anyhow::Result<Sample> {
    let console = work.join(format!("qemu-console-{i}.log"));
    // Distinct CIDs: a CID stays taken until the vhost device is released.
    let cid = 100 + i as u32;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-m",
            &GUEST_MEMORY_MIB.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            &format!("file:{}", console.display()),
            "-no-reboot",
            "-device",
            &format!("vhost-vsock-device,guest-cid={cid}"),
        ])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initramfs)
        // microvm has no i8042 to reset through: a triple fault ends it
        // (with -no-reboot) when the agent reboots.
        .args(["-append", &format!("{CMDLINE} reboot=t")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawning qemu-system-x86_64")?;
    let mut agent = until_healthy(&mut child, "qemu", started, || {
        connect_af_vsock(cid, vmrun_proto::AGENT_VSOCK_PORT)
    })
    .await
    .with_context(|| console_tail(&console))?;
    let ready = started.elapsed();
    let overhead_kib = rss_without_guest_kib(child.id())?;
    let _ = agent.shutdown(vmrun_proto::v1::ShutdownRequest {}).await;
    wait_exit(&mut child, "qemu")?;
    Ok(Sample {
        ready,
        overhead_kib,
    })
}

type Agent = vmrun_proto::AgentClient<tonic::transport::Channel>;

/// Polls `connect` until the agent answers `Health`, the VMM exits, or
/// READY_TIMEOUT passes.
async fn until_healthy<F, Fut>(
    child: &mut Child,
    what: &str,
    started: Instant,
    mut connect: F,
) -> anyhow::Result<Agent>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Agent>>,
{
    loop {
        check_alive(child, what)?;
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            bail!("{what}: no agent after {READY_TIMEOUT:?}");
        }
        if let Ok(mut agent) = connect().await {
            let health = agent.health(vmrun_proto::v1::HealthRequest {}).await;
            if health.is_ok() {
                return Ok(agent);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A gRPC client over kernel vsock (QEMU's vhost-vsock).
async fn connect_af_vsock(
    cid: u32,
    port: u32,
) -> anyhow::Result<vmrun_proto::AgentClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::try_from("http://vsock.invalid")?
        .connect_with_connector(tower::service_fn(
            move |_: tonic::transport::Uri| async move {
                let stream =
                    tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port))
                        .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            },
        ))
        .await?;
    Ok(vmrun_proto::AgentClient::new(channel))
}

/// The guest console's last lines, for a failed boot's error.
fn console_tail(console: &Path) -> String {
    format!(
        "guest console {} ends with:\n{}",
        console.display(),
        vmrun_tests::nested::tail(console, 20)
    )
}

fn check_alive(child: &mut Child, what: &str) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        bail!("{what} exited before its agent answered: {status}");
    }
    Ok(())
}

fn wait_exit(child: &mut Child, what: &str) -> anyhow::Result<()> {
    let pidfd = vmrun_pod::native::pidfd_open(child.id() as i32)?;
    if vmrun_pod::native::poll_exit(&pidfd, Some(Duration::from_secs(30)))? {
        child.wait()?;
        return Ok(());
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("{what} did not exit after the agent's shutdown")
}

/// RSS of `pid` without its guest RAM: every mapping but the anonymous one
/// exactly as large as the guest memory.
fn rss_without_guest_kib(pid: u32) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let guest_kib = GUEST_MEMORY_MIB * 1024;
    let (mut total, mut size, mut skipped) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("Size:") => size = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if size == guest_kib && !skipped {
                    skipped = true;
                } else {
                    total += rss;
                }
            }
            _ => {}
        }
    }
    if !skipped {
        bail!("no {GUEST_MEMORY_MIB} MiB guest memory mapping in /proc/{pid}/smaps");
    }
    Ok(total)
}
