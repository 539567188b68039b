//! Native pod start latency: from `vmrun run pod.yaml` to the container's first
//! output line, next to `runc run` and `crun run` on the same image rootfs.
//!
//! `cargo run --release -p vmrun-benches --bin native_start -- [RUNS]` (as root).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use vmrun_benches::{import_busybox, ms, summarize, time_to_first_line, Summary};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    let work = tempfile::Builder::new().prefix("vmrun-bench").tempdir()?;
    let vmrun = vmrun_tests::pod::vmrun_release_bin();
    let root = work.path().join("root");
    let state = work.path().join("state");

    import_busybox(vmrun, &root, work.path())?;

    let manifest = work.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bench\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: localhost/busybox:latest\n    imagePullPolicy: Never\n    command: [echo, ready]\n",
    )?;
    let mut vmrun_samples = Vec::new();
    for _ in 0..runs {
        vmrun_samples.push(time_to_first_line(
            Command::new(vmrun)
                .arg("--root")
                .arg(&root)
                .arg("--state")
                .arg(&state)
                .args(["run", "--runtime", "native"])
                .arg(&manifest),
        )?);
    }

    // The same rootfs for runc and crun: the image's unpacked layer.
    let bundle = work.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let layers = image_layers(vmrun, &root)?;
    for layer in &layers {
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", layer))
            .arg(&rootfs)
            .status()?;
        if !status.success() {
            bail!("copying layer {layer}");
        }
    }
    write_bundle_config(&bundle)?;
    let mut results: Vec<(&str, Summary)> = vec![("vmrun native", summarize(&vmrun_samples))];
    for runtime in ["runc", "crun"] {
        if runtime == "crun" && hide_hybrid_cgroup2()? {
            println!(
                "crun: this host mounts cgroup v2 beside v1 (hybrid), which crun refuses; \
                 measuring it in a private mount namespace without /sys/fs/cgroup/unified"
            );
        }
        let state_dir = work.path().join(format!("{runtime}-state"));
        let mut samples = Vec::new();
        for i in 0..runs {
            let mut cmd = Command::new(runtime);
            cmd.arg("--root")
                .arg(&state_dir)
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(format!("bench-{i}"));
            match time_to_first_line(&mut cmd) {
                Ok(d) => samples.push(d),
                Err(e) => {
                    // Said by name, never silently dropped: e.g. crun refuses hybrid cgroup hosts.
                    println!(
                        "{runtime}: not measured on this host: {}",
                        e.to_string().trim()
                    );
                    break;
                }
            }
        }
        if samples.len() == runs {
            results.push((runtime, summarize(&samples)));
        }
    }

    println!("native pod start, manifest to first output line, {runs} runs each");
    println!(
        "{:<14} {:>9} {:>9} {:>9}",
        "runtime", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in &results {
        println!(
            "{name:<14} {:>9.1} {:>9.1} {:>9.1}",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    let base = results[0].1;
    for (name, s) in &results[1..] {
        println!(
            "vmrun/{name} ratio: p50 {:.2}x, p99 {:.2}x",
            ms(base.p50) / ms(s.p50),
            ms(base.p99) / ms(s.p99)
        );
    }
    Ok(())
}

const HYBRID_CGROUP2: &str = "/sys/fs/cgroup/unified";

/// crun refuses hosts with cgroup v2 mounted beside v1 ("hybrid mode") as
/// long as v2 has any controller. Hiding the v2 mount from this process
/// alone (runc and vmrun were measured before) lets crun use plain v1, as it
/// would on a pure v1 host. Returns whether anything was hidden.
fn hide_hybrid_cgroup2() -> anyhow::Result<bool> {
    let hybrid = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(HYBRID_CGROUP2));
    if !hybrid {
        return Ok(false);
    }
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    umount2(HYBRID_CGROUP2, MntFlags::MNT_DETACH).context("hide the cgroup v2 mount")?;
    Ok(true)
}

/// Layer directories of the imported image, bottom first.
fn image_layers(vmrun: &Path, root: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(vmrun)
        .arg("--root")
        .arg(root)
        .args(["image", "inspect", "localhost/busybox:latest"])
        .output()?;
    if !out.status.success() {
        bail!(
            "vmrun image inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let image: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("image inspect output")?;
    image["layers"]
        .as_array()
        .context("no layers in image inspect output")?
        .iter()
        .map(|l| l.as_str().map(str::to_string).context("layer path"))
        .collect()
}

/// `runc spec`'s default, running `echo ready` without a terminal.
fn write_bundle_config(bundle: &Path) -> anyhow::Result<()> {
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(bundle)
        .status()?;
    if !status.success() {
        bail!("runc spec failed");
    }
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["echo", "ready"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}
