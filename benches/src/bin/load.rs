//! Load: many pods at once on one host.
//!
//! For each batch, every pod's `vmrun run` (foreground, one process per
//! pod) is spawned before any is waited for. Each pod's start latency is
//! from its spawn to its first container's first output line; once every
//! pod printed, the host memory per pod is what MemAvailable lost since
//! before the batch, over the pods. Then every `vmrun run` is interrupted
//! (SIGINT, as Ctrl-C) and must exit as Ctrl-C makes it (130) having printed each of its
//! containers' line, and nothing may be left: no pod in the state
//! directory, no process of the pods, no cgroup of theirs.
//!
//! `cargo run --release -p vmrun-benches --bin load -- [--native PODS]
//! [--wasm PODSxCONTAINERS] [--vm PODS]` (as root; defaults: 200 native
//! pods, 50 wasm pods of 10 containers, no vm pods: those need hardware
//! KVM or a nested run, see docs/benchmarks.md).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmrun_benches::{import_busybox, import_image, ms, summarize};

const WASM_IMAGE: &str = "localhost/wasm-box:latest";
const BUSYBOX: &str = "localhost/busybox:latest";
/// How long a batch may take to print every pod's first line.
const START_TIMEOUT: Duration = Duration::from_secs(900);

struct Batch {
    runtime: &'static str,
    pods: usize,
    containers: usize,
}

fn parse_args() -> anyhow::Result<Vec<Batch>> {
    let mut batches = vec![
        Batch {
            runtime: "native",
            pods: 200,
            containers: 1,
        },
        Batch {
            runtime: "wasm",
            pods: 50,
            containers: 10,
        },
    ];
    let mut args = std::env::args().skip(1);
    let mut given = Vec::new();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let runtime = match flag.as_str() {
            "--native" => "native",
            "--wasm" => "wasm",
            "--vm" => "vm",
            other => bail!("unknown option {other} (--native N, --wasm PODSxCONTAINERS, --vm N)"),
        };
        let (pods, containers) = match value.split_once('x') {
            Some((p, c)) => (p.parse()?, c.parse()?),
            None => (value.parse()?, 1),
        };
        given.push(Batch {
            runtime,
            pods,
            containers,
        });
    }
    if !given.is_empty() {
        batches = given;
    }
    Ok(batches)
}

fn main() -> anyhow::Result<()> {
    let batches = parse_args()?;
    let work = tempfile::Builder::new().prefix("vmrun-load").tempdir()?;
    let vmrun = vmrun_tests::pod::vmrun_release_bin();
    let root = work.path().join("root");
    import_busybox(vmrun, &root, work.path())?;
    let wasm = vmrun_tests::wasm_programs::wasm_box_p1();
    import_image(
        vmrun,
        &root,
        work.path(),
        &vmrun_tests::images::wasm_image(wasm),
        WASM_IMAGE,
    )?;
    println!(
        "host: {} CPUs, {} MiB memory",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_kib("MemTotal")? / 1024
    );
    let mut failed = 0;
    for batch in &batches {
        failed += run_batch(vmrun, &root, work.path(), batch)?;
    }
    if failed > 0 {
        bail!("{failed} pods failed");
    }
    Ok(())
}

fn manifest(batch: &Batch, index: usize) -> String {
    let name = pod_name(batch, index);
    let mut containers = String::new();
    for c in 0..batch.containers {
        let marker = format!("ran-{name}-{c}");
        let command = match batch.runtime {
            // The module says it started, then idles.
            "wasm" => format!("    image: {WASM_IMAGE}\n    args: [hold, {marker}, '3600']\n"),
            _ => format!(
                "    image: {BUSYBOX}\n    command: [sh, -c, 'echo {marker}; exec sleep 3600']\n"
            ),
        };
        // A small VM per pod: one vCPU, the guest's overhead plus 64 MiB.
        let command = if batch.runtime == "vm" {
            command + "    resources:\n      limits: {memory: 64Mi, cpu: 500m}\n"
        } else {
            command
        };
        containers.push_str(&format!(
            "  - name: c{c}\n    imagePullPolicy: Never\n{command}"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 2\n  containers:\n{containers}"
    )
}

fn pod_name(batch: &Batch, index: usize) -> String {
    format!("load-{}-{index}", batch.runtime)
}

/// A pod's `vmrun run` and the lines it printed, read on a thread.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
}

fn run_batch(vmrun: &Path, root: &Path, work: &Path, batch: &Batch) -> anyhow::Result<usize> {
    let state = work.join(format!("state-{}", batch.runtime));
    let dir = work.join(format!("manifests-{}", batch.runtime));
    std::fs::create_dir_all(&dir)?;
    let manifests: Vec<PathBuf> = (0..batch.pods)
        .map(|i| {
            let path = dir.join(format!("{}.yaml", pod_name(batch, i)));
            std::fs::write(&path, manifest(batch, i)).map(|()| path)
        })
        .collect::<Result<_, _>>()?;
    let available_before = mem_kib("MemAvailable")?;
    let started = Instant::now();
    let mut pods = Vec::with_capacity(batch.pods);
    for manifest in &manifests {
        let spawned_at = Instant::now();
        let mut child = Command::new(vmrun)
            .arg("--root")
            .arg(root)
            .arg("--state")
            .arg(&state)
            .args(["run", "--runtime", batch.runtime])
            .arg(manifest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning vmrun run")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        pods.push((
            spawned_at,
            Running {
                child,
                lines,
                seen: Vec::new(),
            },
        ));
    }
    let spawned_in = started.elapsed();

    // Each pod's first line, in any order.
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let deadline = started + START_TIMEOUT;
    for (index, (spawned_at, pod)) in pods.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        match pod.lines.recv_timeout(left) {
            Ok((at, line)) => {
                latencies.push(at - *spawned_at);
                pod.seen.push(line);
            }
            Err(_) => failures.push(format!("{}: printed nothing", pod_name(batch, index))),
        }
    }
    let all_up = started.elapsed();
    let available_at_peak = mem_kib("MemAvailable")?;

    // Interrupt all, then each must exit 0 having printed every line.
    for (_, pod) in &pods {
        // Not reaped yet, so the pid is still this child's.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pod.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    for (index, (_, mut pod)) in pods.into_iter().enumerate() {
        let name = pod_name(batch, index);
        let status = pod.child.wait()?;
        pod.seen.extend(pod.lines.try_iter().map(|(_, line)| line));
        let missing: Vec<String> = (0..batch.containers)
            .map(|c| format!("ran-{name}-{c}"))
            .filter(|marker| !pod.seen.iter().any(|line| line.contains(marker.as_str())))
            .collect();
        // 130: stopped by the interrupt, as Ctrl-C stops it.
        if !matches!(status.code(), Some(0 | 130)) {
            failures.push(format!("{name}: vmrun run ended with {status}"));
        } else if !missing.is_empty() {
            failures.push(format!("{name}: no output {missing:?}"));
        }
    }
    let stopped = started.elapsed();
    failures.extend(leftovers(&state, batch));

    let containers = batch.pods * batch.containers;
    println!(
        "\n{} batch: {} pods, {} containers, all spawned in {:.0} ms, all printing after {:.1} s, all stopped after {:.1} s",
        batch.runtime,
        batch.pods,
        containers,
        ms(spawned_in),
        all_up.as_secs_f64(),
        stopped.as_secs_f64()
    );
    if !latencies.is_empty() {
        let s = summarize(&latencies);
        println!(
            "  start latency under load (spawn to first line): p50 {:.0} ms, p99 {:.0} ms, mean {:.0} ms",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    let used = available_before.saturating_sub(available_at_peak);
    println!(
        "  host memory with all running: {:.1} MiB in all, {:.2} MiB per pod, {:.2} MiB per container",
        used as f64 / 1024.0,
        used as f64 / 1024.0 / batch.pods as f64,
        used as f64 / 1024.0 / containers as f64
    );
    println!("  failures: {}", failures.len());
    for failure in &failures {
        println!("    {failure}");
    }
    Ok(failures.len())
}

/// What the batch left: pod directories, processes naming its pods,
/// cgroups named after them.
fn leftovers(state: &Path, batch: &Batch) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(pods) = std::fs::read_dir(state.join("pods")) {
        for pod in pods.flatten() {
            found.push(format!("pod directory {}", pod.path().display()));
        }
    }
    let prefix = format!("load-{}-", batch.runtime);
    for (pid, _, cmdline) in vmrun_tests::pod::process_table() {
        if cmdline.contains(&prefix) && pid != std::process::id() as i32 {
            found.push(format!("process {pid}: {cmdline}"));
        }
    }
    let state_text = state.to_string_lossy().into_owned();
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if line.contains(&state_text) {
            found.push(format!("mount: {line}"));
        }
    }
    found
}

fn mem_kib(field: &str) -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches(" kB").parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/meminfo"))
}
